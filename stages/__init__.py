"""Thin DVC entry points, one per stage: `python -m stages.<name>`."""
