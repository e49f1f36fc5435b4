"""Tasks: what a federation learns, from which records (registry.py names them, base.py defines
the interface, one module per task implements it)."""
