"""Loading weights and tokenizers: GGUF files, Hugging Face folders, packaged default models."""

from .loader import load_model, load_tokenizer, resolve_model_path

__all__ = ["load_model", "load_tokenizer", "resolve_model_path"]
