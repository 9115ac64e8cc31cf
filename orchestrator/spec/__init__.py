"""The sweep spec: its schema and checks, the YAML reader, merging several files. Imports no other stage."""
