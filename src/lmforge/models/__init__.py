"""Model directories in Hugging Face layout: loading, conversion, chat tokens."""
