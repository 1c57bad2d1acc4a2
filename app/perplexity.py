"""Perplexity of a GGUF on a text, computed through llama.cpp the way `llama-perplexity` computes it.

Why this way: a perplexity is only comparable with another one measured by the same procedure, and the numbers people
quote for GGUF files (and for quantization loss) come from llama.cpp's `llama-perplexity`. So this follows its
tools/perplexity/perplexity.cpp step by step:

- the whole text is tokenized once (special tokens added as the vocabulary says, none parsed from the text), and a
  text read from a file loses one trailing newline, as `-f FILE` does;
- it is cut into non-overlapping windows of n_ctx tokens (a shorter tail is dropped); each window is evaluated from an
  empty cache, its first token replaced by BOS when the vocabulary adds one (GPT-NeoX does not);
- only the second half is scored (positions n_ctx/2 … n_ctx-2 predict the next token), so every scored token has at
  least n_ctx/2 tokens of context and the number measures the model, not how little context a window's first
  tokens had;
- when n_batch ≥ n_ctx, n_batch/n_ctx windows go into one llama_decode as separate sequences (n_seq), in a context of
  n_seq·n_ctx; when n_batch < n_ctx, a window takes several decodes. Logits are requested only for the scored half;
- the result is exp(mean NLL) and the ± is llama-perplexity's: ppl · sqrt((mean(NLL²) − mean(NLL)²) / (N − 1)).

Deliberate differences: a text of one window is accepted (llama-perplexity wants two), and a context longer than the
model was trained on is allowed with a warning, as llama-perplexity allows it — the number is then mostly a measure of
how badly the model extrapolates, which is sometimes what one wants to know.

This is also the window machinery of `malhae eval compare` (app/compare.py), so both commands score the same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from app.errors import UserError
from app.llama import Context, Model

DEFAULT_BATCH = 2048  # llama-perplexity's default: four windows of 512 per decode
DEFAULT_UBATCH = 512  # llama.cpp's default physical batch; matched so that the matmuls sum in the same order
Progress = Callable[[int, int, float], None]  # (windows done, windows in all, running perplexity)


def read_text(path: Path) -> str:
    """The text of a file as llama-perplexity reads it: bytes as they are (no newline translation), one trailing
    newline removed; mistakes become one-line errors."""
    if not path.exists():
        raise UserError(f"text file {path} does not exist; give a UTF-8 text file with --text")
    if path.is_dir():
        raise UserError(f"{path} is a directory; --text takes one UTF-8 text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                        f"first, e.g. iconv -f cp949 -t utf-8 {path} > text-utf8.txt (EUC-KR/CP949 files are "
                        "common)") from None
    return text.removesuffix("\n")


@dataclass(frozen=True)
class Layout:
    """How windows map onto decodes, derived from --ctx and --batch exactly as llama-perplexity's main() does."""

    n_ctx: int  # tokens per window
    n_batch: int  # tokens per llama_decode
    n_seq: int  # windows per decode (1 when a window needs several decodes)

    @classmethod
    def of(cls, n_ctx: int, n_batch: int = DEFAULT_BATCH) -> Layout:
        if n_ctx < 4:
            raise UserError(f"--ctx {n_ctx} is too small for a perplexity window; use at least 4 (512 is usual)")
        if n_batch < 1:
            raise UserError(f"--batch {n_batch} must be at least 1 (default: {DEFAULT_BATCH})")
        n_seq = max(1, n_batch // n_ctx)
        return cls(n_ctx, min(n_batch, n_seq * n_ctx), n_seq)

    @property
    def first(self) -> int:
        """The first position whose logits are scored (they predict the token after it)."""
        return self.n_ctx // 2

    @property
    def scored_per_window(self) -> int:
        return self.n_ctx - 1 - self.first


def windows(tokens: list[int], n_ctx: int) -> list[list[int]]:
    """Non-overlapping windows of exactly n_ctx tokens; a shorter tail is dropped, as llama-perplexity drops it."""
    return [tokens[i:i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]


def text_tokens(model: Model, text: str) -> list[int]:
    """The text tokenized as llama-perplexity does (common_tokenize(ctx, text, add_special=true))."""
    return model.tokenize(text, add_special=True, parse_special=False)


def text_windows(model: Model, tokens: list[int], layout: Layout) -> list[list[int]]:
    """The windows to evaluate, BOS in front of each when the vocabulary wants one; too short a text is an error."""
    chunks = windows(tokens, layout.n_ctx)
    if not chunks:
        raise UserError(f"the text is {len(tokens)} tokens long, shorter than one window of {layout.n_ctx}; give a "
                        "longer text or a smaller --ctx")
    import llama_cpp as lc

    if lc.llama_vocab_get_add_bos(model.vocab):  # llama-perplexity puts BOS in place of each window's first token
        bos = lc.llama_vocab_bos(model.vocab)
        chunks = [[bos, *c[1:]] for c in chunks]
    return chunks


def context_for(model: Model, layout: Layout, threads: int | None) -> Context:
    return Context(model, n_ctx=layout.n_seq * layout.n_ctx, n_batch=layout.n_batch, threads=threads,
                   n_seq=layout.n_seq, n_ubatch=DEFAULT_UBATCH)


def scored_logits(ctx: Context, chunks: list[list[int]], layout: Layout) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each window in order: the logits of its scored positions [scored_per_window, n_vocab] (float32) and the
    tokens they predict. Up to n_seq windows are evaluated per llama_decode; only their logits are held."""
    import llama_cpp as lc

    n_ctx, n_batch, first = layout.n_ctx, layout.n_batch, layout.first
    n_vocab = ctx.model.n_vocab
    batch = lc.llama_batch_init(n_batch, 0, 1)
    try:
        token = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        wants = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        for group_start in range(0, len(chunks), layout.n_seq):
            group = chunks[group_start:group_start + layout.n_seq]
            out = np.empty((len(group), n_ctx - first, n_vocab), dtype=np.float32)
            ctx.clear()
            for start in range(0, n_ctx, n_batch):
                size = min(n_ctx - start, n_batch)
                positions = np.arange(start, start + size, dtype=np.int32)
                for s, chunk in enumerate(group):
                    rows = slice(s * size, (s + 1) * size)
                    token[rows] = chunk[start:start + size]
                    pos[rows] = positions
                    wants[rows] = positions >= first
                    for i in range(s * size, (s + 1) * size):
                        batch.seq_id[i][0] = s
                n_tokens = size * len(group)
                n_seq_id[:n_tokens] = 1
                batch.n_tokens = n_tokens
                rc = lc.llama_decode(ctx.ptr, batch)
                if rc != 0:
                    raise UserError(f"llama.cpp failed to evaluate a batch of {n_tokens} tokens (llama_decode → {rc}); "
                                    "try a smaller --batch or --ctx")
                lo = max(start, first)
                per_seq = start + size - lo  # outputs each sequence produced in this decode, in batch order
                if per_seq > 0:
                    got = np.ctypeslib.as_array(lc.llama_get_logits(ctx.ptr), shape=(per_seq * len(group), n_vocab))
                    out[:, lo - first:lo - first + per_seq] = got.reshape(len(group), per_seq, n_vocab)
            for s, chunk in enumerate(group):
                yield out[s, :layout.scored_per_window], np.asarray(chunk[first + 1:], dtype=np.int64)
    finally:
        lc.llama_batch_free(batch)


def log_z(logits: np.ndarray) -> np.ndarray:
    """log Σ exp(row) per row, as llama-perplexity computes it: exponentials of (logit − max) in float32, summed in
    float64 (30,080 float32 terms would lose digits)."""
    peak = logits.max(axis=-1, keepdims=True)
    return peak[:, 0].astype(np.float64) + np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row of logits."""
    return log_z(logits) - logits[np.arange(len(targets)), targets].astype(np.float64)


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

    @property
    def tokens_per_second(self) -> float:
        """Tokens evaluated (every position of every window, not only the scored half) per second."""
        return self.windows * self.n_ctx / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": round(self.tokens_per_second, 1)}


def check_context(model: Model, n_ctx: int, notify: Callable[[str], None] | None) -> None:
    import llama_cpp as lc

    trained = lc.llama_model_n_ctx_train(model.ptr)
    if n_ctx > trained and notify:
        notify(f"--ctx {n_ctx} is longer than the {trained} tokens {model.path.name} was trained on; the perplexity "
               "will measure how it extrapolates (llama-perplexity allows this too, with the same warning)")


def evaluate(model: Model, text: str, *, n_ctx: int = 512, n_batch: int = DEFAULT_BATCH, threads: int | None = None,
             progress: Progress | None = None, notify: Callable[[str], None] | None = None) -> PerplexityResult:
    """Perplexity of `text` under a loaded model, with llama-perplexity's estimate and ±."""
    layout = Layout.of(n_ctx, n_batch)
    tokens = text_tokens(model, text)
    chunks = text_windows(model, tokens, layout)
    check_context(model, n_ctx, notify)
    sums = NLLSum()
    started = time.perf_counter()
    with context_for(model, layout, threads) as ctx:
        for done, (logits, targets) in enumerate(scored_logits(ctx, chunks, layout), start=1):
            sums.add(token_nll(logits, targets))
            if progress:
                progress(done, len(chunks), sums.ppl)
    return PerplexityResult(str(model.path), sums.ppl, sums.error, sums.count, len(chunks), layout.n_ctx,
                            layout.n_batch, layout.n_seq, len(tokens), time.perf_counter() - started)


def run(model_path: Path, text_path: Path, *, n_ctx: int = 512, n_batch: int = DEFAULT_BATCH,
        threads: int | None = None, gpu_layers: str = "auto", progress: Progress | None = None,
        notify: Callable[[str], None] | None = None) -> PerplexityResult:
    """`malhae eval ppl`: read the text first (its mistakes are cheaper to report than a model load), then load."""
    from app import hardware
    from app.engine import check_model_file

    layout = Layout.of(n_ctx, n_batch)
    text = read_text(text_path)
    info = check_model_file(model_path)
    layers = gpu_layers_for(info, gpu_layers, layout, notify)
    with Model(model_path, n_gpu_layers=layers) as model:
        return evaluate(model, text, n_ctx=n_ctx, n_batch=n_batch, threads=threads or hardware.physical_cores(),
                        progress=progress, notify=notify)


def gpu_layers_for(info, gpu_layers: str | int, layout: Layout, notify: Callable[[str], None] | None = None) -> int:
    """Layers to offload: a number as given, 0 without GPU support, and for `auto` the engine's planner (app.offload)
    sized for this run's context (n_seq windows) and batch, so that `eval ppl` offloads what `chat` would."""
    from app import hardware, offload

    n_layer = int(info.arch_value("block_count") or 0)
    if isinstance(gpu_layers, str) and gpu_layers != "auto":
        try:
            gpu_layers = int(gpu_layers)
        except ValueError:
            raise UserError(f"--gpu-layers {gpu_layers!r}: use auto, 0 (CPU only) or a number of layers") from None
    if isinstance(gpu_layers, int) and gpu_layers < 0:
        raise UserError("--gpu-layers must be auto, 0 or a positive number")
    if not hardware.llama_supports_gpu():
        if gpu_layers not in ("auto", 0) and notify:
            notify("this llama-cpp-python was built without GPU support; running on the CPU")
        return 0
    if gpu_layers == "auto":
        gpus = hardware.nvidia_gpus()
        if not gpus:
            return 0
        sizes = offload.model_sizes(info, layout.n_seq * layout.n_ctx, layout.n_batch)
        return offload.plan(sizes, sum(g.free for g in gpus)).n_gpu_layers
    return min(int(gpu_layers), n_layer + 1)


def perplexity(model_path: Path, text: str, n_ctx: int = 512, threads: int | None = None) -> tuple[float, int]:
    """(perplexity, number of tokens scored) of `text` under the GGUF at `model_path` (for tests and scripts)."""
    with Model(model_path) as model:
        result = evaluate(model, text, n_ctx=n_ctx, threads=threads)
    return result.ppl, result.tokens_scored


def llama_perplexity_exe() -> Path | None:
    """llama.cpp's own llama-perplexity, where benchmarks/build_llama_tools.py builds it; None when absent."""
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    exe = Path.home() / ".cache" / "malhae" / f"llama-tools-{version}" / "build" / "bin" / "llama-perplexity"
    return exe if exe.is_file() else None


def run_llama_perplexity(exe: Path, model_path: Path, text_path: Path, *, n_ctx: int = 512,
                         n_batch: int = DEFAULT_BATCH, threads: int | None = None) -> tuple[float, float]:
    """(perplexity, ±) from `llama-perplexity -m MODEL -f TEXT -c CTX`, run on the same llama.cpp libraries and
    weight layout as malhae (see app.bench), so that a difference is the method's, not two compilations'."""
    import re
    import subprocess

    from app import hardware
    from app.bench import _same_libraries_env
    from app.llama import use_extra_buffer_types

    cmd = [str(exe), "-m", str(model_path), "-f", str(text_path), "-c", str(n_ctx), "-b", str(n_batch),
           "-t", str(threads or hardware.physical_cores()), "-ngl", "0",
           "--repack" if use_extra_buffer_types() else "--no-repack"]
    for _attempt in range(3):  # its logger writes from a thread and can exit before the last lines are out
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=_same_libraries_env())
        found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
        if found or proc.returncode != 0:
            break
    if proc.returncode != 0 or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama-perplexity failed (exit {proc.returncode}): {tail}")
    return float(found.group(1)), float(found.group(2))
