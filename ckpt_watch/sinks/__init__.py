"""Sinks: where finished suite results go (JSON files, MLflow)."""
