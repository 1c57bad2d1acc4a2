"""Perplexity of a GGUF on a text, computed through llama.cpp the way `llama-perplexity` computes it.

Why this way: a perplexity is only comparable with another one measured by the same procedure, and the numbers people
quote for GGUF files (and for quantization loss) come from llama.cpp's `llama-perplexity`. So this follows it: the
whole text is tokenized once, cut into non-overlapping windows of n_ctx tokens, each window is evaluated from an
empty cache, and only the second half of each window is scored — every scored token then has at least n_ctx/2 tokens
of context, so the number measures the model rather than how little context the first tokens of a window had.
It is the basis of `malhae eval ppl`, the demo model's tests and the quantization benchmark
(benchmarks/quant_quality.py); it runs through app.llama so that it inherits that module's workarounds.

Differences from llama-perplexity, none of which changes the result for GPT-NeoX models: no BOS is put in front of
each window (the family does not add one), and the log-softmax is computed here in numpy rather than in C++.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.errors import UserError
from app.llama import Context, Model


def windows(tokens: list[int], n_ctx: int) -> list[list[int]]:
    """Non-overlapping windows of exactly n_ctx tokens; a shorter tail is dropped, as llama-perplexity drops it."""
    return [tokens[i:i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row of logits: a log-softmax made stable by subtracting each row's maximum, summed
    in float64 (a vocabulary of 30,080 exponentials loses digits in float32)."""
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    return log_z - x[np.arange(len(targets)), targets]


def window_nll(ctx: Context, window: list[int]) -> np.ndarray:
    """NLL of tokens n_ctx//2+1 … n_ctx-1 of one window, each predicted from the logits one position earlier."""
    n = len(window)
    first = n // 2
    logits = ctx.logits(window)
    return token_nll(logits[first:n - 1], np.asarray(window[first + 1:], dtype=np.int64))


def perplexity(model_path: Path, text: str, n_ctx: int = 512, threads: int | None = None) -> tuple[float, int]:
    """(perplexity, number of tokens scored) of `text` under the GGUF at `model_path`."""
    if n_ctx < 4:
        raise UserError(f"a perplexity window of {n_ctx} tokens is too short; use at least 4 (512 is usual)")
    with Model(model_path) as model:
        tokens = model.tokenize(text, add_special=False, parse_special=False)
        chunks = windows(tokens, n_ctx)
        if not chunks:
            raise UserError(f"the text is {len(tokens)} tokens long, shorter than one window of {n_ctx}; give a "
                            "longer text or a smaller context")
        with Context(model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), threads=threads) as ctx:
            nll = np.concatenate([window_nll(ctx, chunk) for chunk in chunks])
    return float(np.exp(nll.mean(dtype=np.float64))), int(nll.size)
