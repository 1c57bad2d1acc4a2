"""Log-probabilities from logits: one log-softmax for every consumer (perplexity, quantization loss, multiple-choice
log-likelihoods, the server's `logprobs` and `echo`), all in float64.

float64 because the KL of a good quantization (~1e-4 nats) is a small difference of large sums, and 30,080 float32
exponentials would put an error of ~1e-7 on each row's normaliser; and one function because lm-evaluation-harness
scoring through the server must give the numbers `malhae eval` gives.
"""

from __future__ import annotations

import numpy as np


def log_z(logits: np.ndarray) -> np.ndarray:
    """log Σ exp(row) for each row, stable (the row's maximum taken out first)."""
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Every row's log-probabilities [rows, n_vocab] (the KL of `eval compare` needs them all)."""
    return logits.astype(np.float64) - log_z(logits)[:, None]


def log_prob(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row: a choice's log-likelihood is their sum, a token's NLL their negative."""
    return logits[np.arange(len(targets)), targets].astype(np.float64) - log_z(logits)


def top(row_logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n likeliest tokens of one row of log-probabilities, likeliest first (ties: the lower id first)."""
    if n <= 0:
        return []
    n = min(n, row_logprobs.shape[-1])
    ids = np.argpartition(-row_logprobs, n - 1)[:n]
    ids = ids[np.lexsort((ids, -row_logprobs[ids]))]
    return [(int(i), float(row_logprobs[i])) for i in ids]
