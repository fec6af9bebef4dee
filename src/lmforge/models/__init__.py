"""Model directories in Hugging Face layout: loading, conversion, chat tokens.

`load_model_dir(path, dtype=None, device="cpu") -> (model, tokenizer)` and
`is_model_dir(path)` are the entry points other packages use. This module imports
no torch or transformers at import time, so the CLI stays fast.
"""

from lmforge.models.model_dir import check_model_dir, is_model_dir, load_model_dir

__all__ = ["check_model_dir", "is_model_dir", "load_model_dir"]
