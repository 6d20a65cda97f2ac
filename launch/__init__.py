"""Sweep expansion, execution backends and reports: ``python -m launch``."""
