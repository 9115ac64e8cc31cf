"""Driving workers: the scheduler loop, its queues, the WorkerPool interface, events, progress. Imports no other stage, nor Ray."""
