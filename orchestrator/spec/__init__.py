"""The sweep spec: its schema and checks, the YAML reader, merging several files. Imports no other stage.

schema (SweepSpec, parse_spec, SpecError), models (the models and candidates a sweep tunes), sections
(tolerances, budgets, measure, decision, workers, deploy), strict (the strict base model, plain names),
checks (the checks behind the validators), reader (YAML and JSON read strictly), merge (several files, one sweep).
"""
