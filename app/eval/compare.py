"""Quantization loss: how far a GGUF's next-token distributions (B) are from a reference's (A) on the same text.

Why these measures: perplexity alone hides most of the loss — on text unlike the training data a model's own
uncertainty dominates and a quantized file's perplexity barely moves until the damage is large — while the KL
divergence KL(P_A ‖ P_B) per token and the share of positions where both pick the same most likely token show it at
every step (llama-perplexity --kl-divergence reports the same quantities). Both files are evaluated on exactly the
windows and positions `malhae eval ppl` scores (app.runtime.windows), so each file's perplexity here is the one
`eval ppl` prints, and the ratio B/A is the usual headline number.

Memory: the two models are loaded together and the text is processed a decode group at a time (at most n_seq windows
of logits per model), so nothing grows with the length of the text except one float per scored token (for the KL
percentiles). KL is computed exactly from the float32 logits, in float64, rather than from llama-perplexity's 16-bit
quantized log-probabilities, so the two tools agree closely but not to the last digit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from malhae.errors import UserError
from malhae.eval.scoring import NLLSum, log_softmax
from malhae.runtime import kv, windows
from malhae.runtime.llama import Model
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import Layout

Progress = Callable[[int, int, float], None]  # (windows done, windows in all, running mean KL)


def kl_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(P_ref ‖ P) in nats for each row of two log-softmax arrays: Σ p_ref (log p_ref − log p)."""
    return (np.exp(ref) * (ref - got)).sum(axis=-1)


def vocab_pieces(model: Model) -> list[bytes]:
    """Every token's text (special tokens included): two files whose lists differ do not score the same tokens."""
    return [model.token_bytes(t, special=True) for t in range(model.n_vocab)]


def check_same_vocab(a: Model, b: Model) -> None:
    if a.n_vocab != b.n_vocab:
        raise UserError(f"{a.path.name} and {b.path.name} have different vocabularies ({a.n_vocab:,} and "
                        f"{b.n_vocab:,} tokens); compare two conversions of the same model")
    pa, pb = vocab_pieces(a), vocab_pieces(b)
    if pa != pb:
        first = next(i for i, (x, y) in enumerate(zip(pa, pb, strict=True)) if x != y)
        raise UserError(f"{a.path.name} and {b.path.name} have different vocabularies (token {first} is "
                        f"{pa[first]!r} in one and {pb[first]!r} in the other); compare two conversions of the same "
                        "model")


@dataclass(frozen=True)
class CompareResult:
    model_a: str
    model_b: str
    kl_mean: float  # nats per scored token
    kl_error: float  # standard error of the mean
    kl_max: float
    kl_p99: float
    kl_median: float
    top1: float  # share of scored positions where both files' most likely token is the same
    ppl_a: float
    ppl_b: float
    tokens_scored: int
    windows: int
    n_ctx: int
    seconds: float
    kv_cache_a: tuple[str, str] = ("f16", "f16")  # (K, V) of A's context and B's
    kv_cache_b: tuple[str, str] = ("f16", "f16")
    flash_attn: str = "auto"  # both contexts'
    adapters: tuple[str, ...] = ()  # the LoRA adapters both contexts applied (--lora), as written there

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_b / self.ppl_a

    def as_dict(self) -> dict:
        return asdict(self) | {"ppl_ratio": self.ppl_ratio}


def evaluate(a: Model, b: Model, text: str, layout: Layout | None = None, options: LoadOptions | None = None, *,
             reference: LoadOptions | None = None, progress: Progress | None = None,
             notify: Callable[[str], None] | None = None) -> CompareResult:
    """Compare two loaded models on `text`, window by window (`layout`: llama-perplexity's by default; `options`:
    how the contexts are made; `reference`: A's context instead, when it differs — a KV cache comparison, where a and
    b are one model)."""
    layout = layout or Layout.of()
    options = options or LoadOptions()
    reference = reference or options
    if a is not b:
        check_same_vocab(a, b)
    chunks = windows.text_windows(a, windows.text_tokens(a, text), layout)
    windows.check_context(a, layout.n_ctx, notify)
    nll_a, nll_b = NLLSum(), NLLSum()
    kls: list[np.ndarray] = []
    same = 0
    kl_sum = 0.0
    started = time.perf_counter()
    with windows.context_for(a, layout, reference) as ctx_a, windows.context_for(b, layout, options) as ctx_b:
        pairs = zip(windows.scored_logits(ctx_a, chunks, layout), windows.scored_logits(ctx_b, chunks, layout),
                    strict=True)
        for done, ((la, targets), (lb, _)) in enumerate(pairs, start=1):
            lpa, lpb = log_softmax(la), log_softmax(lb)  # once each: the NLLs and the KL come from them
            rows = np.arange(len(targets))
            nll_a.add(-lpa[rows, targets])
            nll_b.add(-lpb[rows, targets])
            kls.append(kl_rows(lpa, lpb))
            kl_sum += float(kls[-1].sum())
            same += int((la.argmax(-1) == lb.argmax(-1)).sum())
            if progress:
                progress(done, len(chunks), kl_sum / (done * layout.scored_per_window))
    kl = np.concatenate(kls)
    error = float(kl.std(ddof=1) / np.sqrt(kl.size)) if kl.size > 1 else float("nan")
    return CompareResult(str(a.path), str(b.path), float(kl.mean()), error, float(kl.max()),
                         float(np.percentile(kl, 99)), float(np.median(kl)), same / kl.size, nll_a.ppl, nll_b.ppl,
                         int(kl.size), len(chunks), layout.n_ctx, time.perf_counter() - started,
                         (ctx_a.type_k, ctx_a.type_v), (ctx_b.type_k, ctx_b.type_v), options.flash_attn,
                         tuple(map(str, options.lora)))


def kv_reference(options: LoadOptions) -> LoadOptions:
    """The reference for a KV cache comparison: f16 K and V, with the same flash attention setting (not --precise's
    f32 without it), so that the difference measured is the cache's types and nothing else."""
    if not (kv.quantized(options.kv_cache_k) or kv.quantized(options.kv_cache_v)):
        raise UserError("eval compare needs two models (A B), or one model and the KV cache type to measure against "
                        "f16: e.g. eval compare MODEL --kv-cache q8_0 --text FILE")
    return replace(options, kv_cache_k="f16", kv_cache_v="f16")


def run(path_a: Path, path_b: Path | None, text_path: Path, layout: Layout | None = None,
        options: LoadOptions | None = None, *, progress: Progress | None = None,
        notify: Callable[[str], None] | None = None) -> CompareResult:
    """`malhae eval compare`: both models loaded as `options` say (their layers, devices, threads, K/V types; its
    model field is not used), cheap checks first (arguments, text, vocabularies), then both models loaded at once.
    Its LoRA adapters (--lora) apply to both sides, so that B's loss is measured under the same adapters; one side
    alone is `evaluate(a, b, …, options, reference=…)` with the adapters in one of the two.

    With `--gpu-layers auto`, A is planned into the free VRAM first and B into what A leaves on each device.

    Without B: what `options`' quantized KV cache costs against f16 (kv_reference) on the same weights. The file is
    loaded once, with two contexts on it, so that both run on the same devices and only the cache differs; it is
    planned as if one context held both caches at f16 and twice the batch, an upper bound on the two contexts'."""
    from malhae.runtime import hardware, lora, offload
    from malhae.runtime.engine import check_model_file

    layout = layout or Layout.of()
    options = options or LoadOptions()
    options = replace(options, threads=options.threads or hardware.physical_cores())
    reference = kv_reference(options) if path_b is None else None
    kv.check_types(options.kv_cache_k, options.kv_cache_v, options.flash_attn)
    text = windows.read_text(text_path)
    info_a = check_model_file(path_a)
    lora.check(options.lora, info_a)
    shaped = layout.options(options)
    if path_b is None:
        both = replace(shaped, kv_cache_k="f16", kv_cache_v="f16", parallel=2 * shaped.parallel,
                       batch=2 * shaped.batch)
        with Model.planned(replace(options, model=path_a), offload.choose(info_a, both, notify=notify)) as a:
            return evaluate(a, a, text, layout, options, reference=reference, progress=progress, notify=notify)
    info_b = check_model_file(path_b)
    lora.check(options.lora, info_b)  # --lora applies to both: it must fit both
    with Model(path_a, vocab_only=True) as va, Model(path_b, vocab_only=True) as vb:
        check_same_vocab(va, vb)
    plan_a = offload.choose(info_a, shaped, notify=notify)
    plan_b = offload.choose(info_b, shaped, reserved=plan_a.used())
    with Model.planned(replace(options, model=path_a), plan_a) as a, \
            Model.planned(replace(options, model=path_b), plan_b) as b:
        return evaluate(a, b, text, layout, options, progress=progress, notify=notify)
