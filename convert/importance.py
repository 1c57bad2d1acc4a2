"""`malhae imatrix`: the importance matrix of a GGUF over a text, computed by llama.cpp as `llama-imatrix` computes it.

The procedure is llama-imatrix's (tools/imatrix/imatrix.cpp, compute_imatrix), so that the two give the same file:
the text is tokenized once and cut into chunks of `--ctx` tokens exactly as llama-perplexity cuts its windows
(app.runtime.windows: BOS in front of a chunk when the vocabulary adds one, a shorter tail dropped, n_batch/n_ctx chunks
per decode as separate sequences), every position's logits are requested (else llama.cpp skips the last layer's
feed-forward for positions nobody reads), and app.runtime.activations adds up the squared inputs of every `blk.*`
matrix multiplication while llama.cpp evaluates. The second half of each chunk is scored as llama-imatrix scores it,
so the perplexity it prints is a check that the model reads the text sensibly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from malhae.convert import corpus
from malhae.convert.imatrix import Imatrix, write
from malhae.errors import UserError
from malhae.runtime.activations import MIN_ROWS, SquareSums
from malhae.runtime.interrupts import Interrupts
from malhae.runtime.llama import Model
from malhae.runtime.logprobs import NLLSum, log_prob
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import (
    DEFAULT_BATCH,
    Layout,
    check_context,
    context_for,
    read_text,
    scored_logits,
    text_tokens,
)
from malhae.runtime.windows import text_windows as windows_of

Progress = Callable[[int, int, float], None]  # (chunks done, chunks in all, running perplexity)
MAX_CHUNKS = 1 << 20
DEFAULT_CTX = 512  # llama-imatrix's default
FULL_PRECISION = {"f32", "f16", "bf16", "q8_0"}  # types an imatrix is faithfully computed on


@dataclass(frozen=True)
class Result:
    path: Path | None
    entries: int
    chunks: int
    chunk_size: int
    text_tokens: int
    ppl: float
    seconds: float
    datasets: tuple[str, ...]


def chunk_layout(n_ctx: int = DEFAULT_CTX, n_batch: int = DEFAULT_BATCH) -> Layout:
    """The windows of `malhae imatrix --ctx N --batch B`: perplexity's layout, of at least MIN_ROWS tokens."""
    if n_ctx < MIN_ROWS:
        raise UserError(f"--ctx {n_ctx} is too small: llama.cpp's importance matrix ignores batches of fewer than "
                        f"{MIN_ROWS} tokens; use --ctx 512 (llama-imatrix's default) or at least {MIN_ROWS}")
    return Layout.of(n_ctx, n_batch)


def compute(model: Model, text: str, layout: Layout | None = None, options: LoadOptions | None = None, *,
            chunks: int | None = None, datasets: tuple[str, ...] = (), output: bool = False, copy: bool | None = None,
            progress: Progress | None = None, notify: Callable[[str], None] | None = None
            ) -> tuple[Imatrix, float, int]:
    """(the importance matrix, the perplexity of the scored halves, the text's tokens) of `text` under `model`,
    in `layout`'s chunks (llama-imatrix's --ctx-size and --batch-size; default 512 and 2048, as llama-imatrix), on
    a context made as `options` say (threads)."""
    layout = chunk_layout(layout.n_ctx, layout.n_batch) if layout else chunk_layout()
    if chunks is not None and not 1 <= chunks <= MAX_CHUNKS:
        raise UserError(f"--chunks {chunks} must be from 1 to {MAX_CHUNKS} (default: all the text)")
    if not text.strip():
        raise UserError("the calibration text is empty; give a UTF-8 text file with some Korean in it (--text)")
    tokens = text_tokens(model, text)
    windows = windows_of(model, tokens, layout)[:chunks]
    check_context(model, layout.n_ctx, notify)
    collector = SquareSums(output=output, copy=copy)
    sums = NLLSum()
    # Ctrl-C arrives while llama.cpp runs the collector: held, it stops llama_decode and is raised here
    with Interrupts() as interrupted, context_for(model, layout, options, eval_callback=collector.callback,
                                                  abort=interrupted) as ctx:
        if progress:  # the bar shows at once: the first decode group of a large model takes a minute on a CPU
            progress(0, len(windows), float("nan"))
        scored = scored_logits(ctx, windows, layout, every_position=True, in_place=True)
        for done, (logits, targets) in enumerate(scored, start=1):
            interrupted.check()
            collector.check()
            sums.add(-log_prob(logits, targets))
            if progress:
                progress(done, len(windows), sums.ppl)
        collector.check()
    if not collector.sums:
        raise UserError(f"no matrix multiplication of {model.path.name} reached the collector; is it a model "
                        "llama.cpp evaluates on the CPU or GPU (not a vocabulary-only file)?")
    im = Imatrix(dict(collector.sums), dict(collector.counts), list(datasets),
                 chunk_count=len(windows), chunk_size=layout.n_ctx)
    return im, sums.ppl, len(tokens)


def calibration(text_path: Path | None) -> tuple[tuple[str, ...], str]:
    """(dataset names, text): a user's file, or malhae's Korean calibration corpus when none is given."""
    if text_path is None:
        name, text = corpus.calibration_text()
        return (name,), text
    return (text_path.name,), read_text(text_path)


def compute_file(options: LoadOptions, text: str, *, datasets: tuple[str, ...], layout: Layout | None = None,
                 chunks: int | None = None, output: bool = False, progress: Progress | None = None,
                 notify: Callable[[str], None] | None = None) -> tuple[Imatrix, float, int]:
    """Load options.model (offloaded, threaded as `options` say) and compute; `layout` None: chunks of
    DEFAULT_CTX, or of the context the model was trained on if that is shorter (--imatrix auto)."""
    from malhae.runtime import hardware, offload
    from malhae.runtime.engine import check_model_file

    model_path = options.model
    info = check_model_file(model_path)
    if info.file_type and info.file_type not in FULL_PRECISION and notify:
        notify(f"{model_path.name} is {info.file_type}: an importance matrix is best computed on the F16 (or Q8_0) "
               "file the quantized one is made from")
    layout = layout or chunk_layout(min(DEFAULT_CTX, info.arch_int("context_length") or DEFAULT_CTX))
    options = replace(options, threads=options.threads or hardware.physical_cores())
    plan = offload.choose(info, layout.options(options), notify=notify)
    # held from the load on (llama.cpp logs through a callback while it loads): compute's first decode then stops
    with Interrupts(), Model.planned(options, plan) as model:
        return compute(model, text, layout, options, chunks=chunks, datasets=datasets, output=output,
                       progress=progress, notify=notify)


def run(options: LoadOptions, out: Path, *, text_path: Path | None = None, force: bool = False,
        layout: Layout | None = None, chunks: int | None = None, output: bool = False,
        progress: Progress | None = None, notify: Callable[[str], None] | None = None) -> Result:
    """Everything `malhae imatrix` does for options.model: check the cheap things first (output path, text), then
    load and compute (`layout`: chunks of 512 tokens, 2048 per decode, unless given)."""
    from malhae import files

    files.check_target(out, force, replace_hint="add --force to overwrite it", other_hint="choose another -o")
    datasets, text = calibration(text_path)
    if not text.strip():
        raise UserError(f"{text_path} is empty; give a UTF-8 text file with some Korean in it")
    started = time.perf_counter()
    im, ppl, n_tokens = compute_file(options, text, datasets=datasets, layout=layout or chunk_layout(),
                                     chunks=chunks, output=output, progress=progress, notify=notify)
    write(im, out, force=force)
    return Result(out, len(im.sums), im.chunk_count, im.chunk_size, n_tokens, ppl, time.perf_counter() - started,
                  datasets)
