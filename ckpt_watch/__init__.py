"""ckpt-watch: evaluate every LoRA checkpoint of a fine-tuning run as it lands."""

__version__ = "0.1.0"
