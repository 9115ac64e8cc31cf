"""Runs without Ray or devices: a simulated pool and sweep, and backends that crash, hang or lie for fault tests. Imports dispatch only."""
