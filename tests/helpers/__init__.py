"""Shared helpers for the convspec tests."""
