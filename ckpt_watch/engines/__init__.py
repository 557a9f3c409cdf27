"""Engines: where a checkpoint's adapter is loaded and queried."""
