"""orchestrator: parallel tuning sweeps on Ray (workers per device, dedupe by key, store, selection, deploy)."""
