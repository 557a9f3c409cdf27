"""Sinks: where finished suite results go (JSON files, MLflow, W&B: built by `app.build_sinks`)."""
