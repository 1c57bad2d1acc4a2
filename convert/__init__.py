"""Hugging Face GPT-NeoX (Polyglot-Ko) checkpoints → GGUF, proven against the original tokenizer and weights."""
