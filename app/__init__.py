"""malhae (말해): a local, offline Korean assistant on llama.cpp.

runtime (llama.cpp: load, tokenize, generate, offload) → chat · store · eval (what is built on it) → cli (Typer).
errors · flags · files · units · ui · children: the few rules every layer shares (user errors, process flags, where
and how files are written, how numbers are shown, the terminal, child processes that die with malhae).
convert/ (beside app/) turns checkpoints into GGUF on the runtime.
"""

__version__ = "0.1.0"
