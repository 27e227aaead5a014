"""Placement baselines, one module per method, registered by name."""
