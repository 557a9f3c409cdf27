"""The CPU demo: a real LoRA fine-tune whose checkpoints ckpt-watch evaluates as they land."""
