"""lmforge: fine-tune causal language models from Jinja-preprocessed YAML configs."""

__version__ = "0.1.0"
