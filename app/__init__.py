"""malhae (말해): a local, offline Korean assistant on llama.cpp."""

__version__ = "0.1.0"
