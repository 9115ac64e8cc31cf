"""From a spec and the store's history to jobs: candidates, keys, reuse decisions, families, the plan forecast. Imports spec, store and dispatch's gate, never Ray."""
