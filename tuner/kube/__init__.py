"""Kubernetes: ConfigMaps built as pure values (objects.py), written by a thin client (apply.py)."""
