"""Choosing winners and telling about them: selection, diff between sweeps, reports. Imports spec and store, never Ray."""
