"""Built-in evaluation suites; importing this package registers them all."""

from ckpt_watch.suites import arc  # noqa: F401
