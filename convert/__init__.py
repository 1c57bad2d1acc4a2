"""Hugging Face GPT-NeoX (Polyglot-Ko) checkpoints → GGUF, proven against the original tokenizer and weights.

pipeline (the whole conversion) · checkpoint, config, vocab (reading) · gguf_out, tensors (writing) · parity, verify
(proofs) · quantize (llama.cpp's quantizer in a child process) · types (--type) · sizing (catalog sizes) · imatrix
(the importance-matrix file) · importance (computing one) · corpus (the calibration text and the held-out text).
"""
