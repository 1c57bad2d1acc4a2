"""The running sums a perplexity and its ± come from; the log-softmax itself is the runtime's (app.runtime.logprobs),
shared with the server's prompt log-probabilities so that both score a text alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app.runtime.logprobs import log_prob, log_softmax, log_z

__all__ = ["NLLSum", "log_prob", "log_softmax", "log_z"]


@dataclass
class NLLSum:
    """Running sums of NLL and NLL², from which llama-perplexity reports its estimate and its ±."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        self.count += int(values.size)
        self.nll += float(values.sum())
        self.nll2 += float((values * values).sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    @property
    def error(self) -> float:
        """The ± llama-perplexity prints: the standard error of the mean NLL, carried through exp()."""
        if self.count < 2:
            return float("nan")
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return math.sqrt(var / (self.count - 1)) * self.ppl if var > 0 else 0.0
