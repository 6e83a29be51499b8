"""Checkpoint and config I/O. Knows nothing of specs."""
