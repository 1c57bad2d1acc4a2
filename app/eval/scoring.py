"""What eval scores with: the running sums a perplexity and its ± come from and the log-softmax, both the runtime's
(app.runtime.logprobs), shared with the server's prompt log-probabilities and the importance matrix's perplexity so
that all of them score a text alike."""

from __future__ import annotations

from malhae.runtime.logprobs import NLLSum, log_prob, log_softmax, log_z

__all__ = ["NLLSum", "log_prob", "log_softmax", "log_z"]
