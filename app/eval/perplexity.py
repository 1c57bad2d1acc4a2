"""Perplexity of a GGUF on a text, computed through llama.cpp the way `llama-perplexity` computes it.

The text, its windows and which positions are scored are app.runtime.windows' (llama-perplexity's procedure, step by
step); the result is exp(mean NLL) and the ± is llama-perplexity's: ppl · sqrt((mean(NLL²) − mean(NLL)²) / (N − 1)).

Deliberate differences: a text of one window is accepted (llama-perplexity wants two), and a context longer than the
model was trained on is allowed with a warning, as llama-perplexity allows it — the number is then mostly a measure of
how badly the model extrapolates, which is sometimes what one wants to know.

Not a difference: the text is measured as given, never composed to NFC as prompts are (app.nfc), since the number is
about that file (and llama-perplexity's is too); `malhae eval ppl` warns when the file is not NFC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from malhae.eval.scoring import NLLSum, log_prob
from malhae.runtime.llama import Model
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import (
    Layout,
    check_context,
    context_for,
    read_text,
    scored_logits,
    text_tokens,
    text_windows,
)

Progress = Callable[[int, int, float], None]  # (windows done, windows in all, running perplexity)


@dataclass(frozen=True)
class PerplexityResult:
    model: str
    ppl: float
    error: float  # ± as llama-perplexity reports it
    tokens_scored: int
    windows: int
    n_ctx: int
    n_batch: int
    n_seq: int
    text_tokens: int
    seconds: float
    adapters: tuple[str, ...] = ()  # the LoRA adapters applied (--lora), as written there

    @property
    def tokens_per_second(self) -> float:
        """Tokens evaluated (every position of every window, not only the scored half) per second."""
        return self.windows * self.n_ctx / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": round(self.tokens_per_second, 1)}


def evaluate(model: Model, text: str, layout: Layout | None = None, options: LoadOptions | None = None, *,
             progress: Progress | None = None, notify: Callable[[str], None] | None = None) -> PerplexityResult:
    """Perplexity of `text` under a loaded model, with llama-perplexity's estimate and ±; `layout`: the windows
    (default: llama-perplexity's 512 tokens, 2048 per decode), `options`: how the context is made (threads)."""
    layout = layout or Layout.of()
    tokens = text_tokens(model, text)
    chunks = text_windows(model, tokens, layout)
    check_context(model, layout.n_ctx, notify)
    sums = NLLSum()
    started = time.perf_counter()
    with context_for(model, layout, options) as ctx:
        for done, (logits, targets) in enumerate(scored_logits(ctx, chunks, layout), start=1):
            sums.add(-log_prob(logits, targets))
            if progress:
                progress(done, len(chunks), sums.ppl)
    return PerplexityResult(str(model.path), sums.ppl, sums.error, sums.count, len(chunks), layout.n_ctx,
                            layout.n_batch, layout.n_seq, len(tokens), time.perf_counter() - started,
                            tuple(map(str, options.lora)) if options else ())


def run(options: LoadOptions, text_path: Path, layout: Layout | None = None, *, progress: Progress | None = None,
        notify: Callable[[str], None] | None = None) -> PerplexityResult:
    """`malhae eval ppl` on options.model: read the text first (its mistakes are cheaper to report than a model
    load), then load it as `options` say (its layers, devices, threads, adapters) for `layout`'s windows."""
    from malhae.runtime import hardware, lora, offload
    from malhae.runtime.engine import check_model_file

    layout = layout or Layout.of()
    text = read_text(text_path)
    info = check_model_file(options.model)
    lora.check(options.lora, info)  # its adapters too, before anything loads
    options = replace(options, threads=options.threads or hardware.physical_cores())
    plan = offload.choose(info, layout.options(options), notify=notify)
    with Model.planned(options, plan) as model:
        return evaluate(model, text, layout, options, progress=progress, notify=notify)


def perplexity(model_path: Path, text: str, layout: Layout | None = None) -> tuple[float, int]:
    """(perplexity, number of tokens scored) of `text` under the GGUF at `model_path` (for tests and scripts)."""
    with Model(model_path) as model:
        result = evaluate(model, text, layout)
    return result.ppl, result.tokens_scored
