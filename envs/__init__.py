"""Gymnasium environments for device placement."""
