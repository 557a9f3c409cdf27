"""Built-in evaluation suites; importing this package registers them all."""

from ckpt_watch.suites import (
    alignment,  # noqa: F401
    arc,  # noqa: F401
    collapse,  # noqa: F401
    compliance,  # noqa: F401
    general,  # noqa: F401
    heldout,  # noqa: F401
    leakage,  # noqa: F401
    lm_eval,  # noqa: F401  (issue 16; imports the lm-eval package only when configured)
)
