"""Exception types shared by modules that cannot import each other (config → suites → judge)."""

from __future__ import annotations


class ConfigError(Exception):
    """Invalid configuration; `errors` is a list of (dotted path, reason)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{path}: {reason}" for path, reason in errors))
