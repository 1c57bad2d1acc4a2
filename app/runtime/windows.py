"""The text a perplexity is measured on, and its windows: what `eval ppl` and `eval compare` both score, and what
`malhae imatrix` reads (llama-imatrix cuts its chunks exactly as llama-perplexity cuts its windows). In the runtime
because both eval and convert need it.

Why this way: a perplexity is only comparable with another one measured by the same procedure, and the numbers people
quote for GGUF files come from llama.cpp's `llama-perplexity`, so this follows its tools/perplexity/perplexity.cpp:

- the whole text is tokenized once (special tokens added as the vocabulary says, none parsed from the text), and a
  text read from a file loses one trailing newline, as `-f FILE` does;
- it is cut into non-overlapping windows of n_ctx tokens (a shorter tail is dropped); each window is evaluated from an
  empty cache, its first token replaced by BOS when the vocabulary adds one (GPT-NeoX does not);
- only the second half is scored (positions n_ctx/2 … n_ctx-2 predict the next token), so every scored token has at
  least n_ctx/2 tokens of context and the number measures the model, not how little context a window's first
  tokens had;
- when n_batch ≥ n_ctx, n_batch/n_ctx windows go into one llama_decode as separate sequences (n_seq), in a context of
  n_seq·n_ctx; when n_batch < n_ctx, a window takes several decodes. Logits are requested only for the scored half
  (every position for the importance matrix, as llama-imatrix requests them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from malhae import files
from malhae.errors import UserError
from malhae.runtime.llama import Batch, Context, Model
from malhae.runtime.settings import LoadOptions

DEFAULT_WINDOW = 512  # llama-perplexity's default --ctx
DEFAULT_BATCH = 2048  # llama-perplexity's default: four windows of 512 per decode
MAX_TOKENS = 1 << 20  # the largest context the settings table allows
MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold
DEFAULT_UBATCH = 512  # llama.cpp's default physical batch; matched so that the matmuls sum in the same order


MAX_TEXT = 1 << 30  # 1 GB of text is hours of scoring; more is a wrong file


def read_text(path: Path) -> str:
    """The text of a file as llama-perplexity reads it: bytes as they are (no newline translation), one trailing
    newline removed; mistakes become one-line errors."""
    text = files.read_user_text(path, "text file", limit=MAX_TEXT, fix="--text takes one UTF-8 text file")
    return text.removesuffix("\n")


@dataclass(frozen=True)
class Layout:
    """How windows map onto decodes, derived from --ctx and --batch exactly as llama-perplexity's main() does."""

    n_ctx: int  # tokens per window
    n_batch: int  # tokens per llama_decode
    n_seq: int  # windows per decode (1 when a window needs several decodes)

    @classmethod
    def of(cls, n_ctx: int = DEFAULT_WINDOW, n_batch: int = DEFAULT_BATCH) -> Layout:
        if n_ctx < 4:
            raise UserError(f"--ctx {n_ctx} is too small for a perplexity window; use at least 4 (512 is usual)")
        if n_ctx > MAX_TOKENS:
            raise UserError(f"--ctx {n_ctx} is larger than any context ({MAX_TOKENS}); 512 is usual")
        if not 1 <= n_batch <= MAX_TOKENS:
            raise UserError(f"--batch {n_batch} must be from 1 to {MAX_TOKENS} (default: {DEFAULT_BATCH})")
        n_seq = max(1, n_batch // n_ctx)
        if n_seq > MAX_SEQ:  # --batch 100000000 once asked llama.cpp for a context of 10⁸ tokens
            raise UserError(f"--batch {n_batch} puts {n_seq} windows of {n_ctx} into one decode; llama.cpp takes at "
                            f"most {MAX_SEQ}: use --batch {MAX_SEQ * n_ctx} or less")
        return cls(n_ctx, min(n_batch, n_seq * n_ctx), n_seq)

    def options(self, load: LoadOptions) -> LoadOptions:
        """`load` with this layout's context, batch and sequences: one window per sequence, n_seq of them."""
        return replace(load, ctx=self.n_ctx, batch=self.n_batch, parallel=self.n_seq)

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
    bos = model.bos
    if bos is not None:  # llama-perplexity puts BOS in place of each window's first token
        chunks = [[bos, *c[1:]] for c in chunks]
    return chunks


def context_for(model: Model, layout: Layout, options: LoadOptions | None = None,
                eval_callback: object | None = None, abort: Callable[[], bool] | None = None) -> Context:
    """A context for `layout`'s windows, loaded as `options` say otherwise (threads, and what later issues add)."""
    return Context(model, layout.options(options or LoadOptions()), n_ubatch=DEFAULT_UBATCH,
                   eval_callback=eval_callback, abort=abort)


def scored_logits(ctx: Context, chunks: list[list[int]], layout: Layout, *, every_position: bool = False,
                  in_place: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each window in order: the logits of its scored positions [scored_per_window, n_vocab] (float32) and the
    tokens they predict. Up to n_seq windows are evaluated per llama_decode; only their logits are held.

    `every_position` asks llama.cpp for the logits of every position, as llama-imatrix does: otherwise llama.cpp
    computes the last layer's attention output and feed-forward only for the positions whose logits are wanted.
    `in_place` yields views of llama.cpp's own logits buffer instead of copies when a window takes one decode, which
    saves n_seq windows' worth of logits (123 MB at the 1.3B's vocabulary): each view is valid only until the next
    window is asked for, so the caller must be done with it by then."""
    n_ctx, n_batch, first = layout.n_ctx, layout.n_batch, layout.first
    wanted_from = 0 if every_position else first
    n_vocab = ctx.model.n_vocab
    one_decode = in_place and n_ctx <= n_batch
    with Batch(n_batch) as batch:
        for group_start in range(0, len(chunks), layout.n_seq):
            group = chunks[group_start:group_start + layout.n_seq]
            out = None if one_decode else np.empty((len(group), n_ctx - first, n_vocab), dtype=np.float32)
            ctx.clear()
            for start in range(0, n_ctx, n_batch):
                size = min(n_ctx - start, n_batch)
                positions = np.arange(start, start + size, dtype=np.int32)
                batch.n_tokens = size * len(group)
                for s, chunk in enumerate(group):
                    rows = slice(s * size, (s + 1) * size)
                    batch.token[rows] = chunk[start:start + size]
                    batch.pos[rows] = positions
                    batch.wants_logits[rows] = positions >= wanted_from
                    for i in range(s * size, (s + 1) * size):
                        batch.set_seqs(i, (s,))
                ctx.decode(batch, "try a smaller --batch or --ctx")
                lo = max(start, first)
                per_seq = start + size - lo  # outputs each sequence produced in this decode, in batch order
                if per_seq > 0:
                    n_out = start + size - max(start, wanted_from)  # outputs per sequence, in batch order
                    got = ctx.output_logits(n_out * len(group)).reshape(len(group), n_out, n_vocab)
                    if out is None:  # the whole window came from this one decode: hand out views of it
                        out = got[:, n_out - per_seq:]
                    else:
                        out[:, lo - first:lo - first + per_seq] = got[:, n_out - per_seq:]
            for s, chunk in enumerate(group):
                yield out[s, :layout.scored_per_window], np.asarray(chunk[first + 1:], dtype=np.int64)


def check_context(model: Model, n_ctx: int, notify: Callable[[str], None] | None) -> None:
    trained = model.n_ctx_train
    if n_ctx > trained and notify:
        notify(f"--ctx {n_ctx} is longer than the {trained} tokens {model.path.name} was trained on; the perplexity "
               "will measure how it extrapolates (llama-perplexity allows this too, with the same warning)")
