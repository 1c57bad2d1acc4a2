"""Log-likelihood of continuations given a context, through llama.cpp: the primitive of multiple-choice evaluation.

Why it is shaped this way: a multiple-choice question asks for log p(choice | prompt) for every choice, and the
prompt (often many few-shot examples) is far longer than the choices. So the prompt is decoded once, with the seq ids
of all choices on each of its tokens (one unified KV cache), and then every choice is decoded in the same batches as
its own sequence. Logits are requested only where a continuation token is predicted.

The arithmetic follows lm-evaluation-harness's `_loglikelihood_tokens` (polyglot branch, lm_eval/base.py): the input
is `(context + continuation)[-(max_length + 1):][:-1]`, the scored positions are the last len(continuation) ones, and
the answer is the sum of log-softmax values of the continuation tokens. When that left truncation cuts the context,
choices of different lengths see differently truncated contexts; they are then grouped by where their context starts
and each group shares its own prompt, so the numbers stay the harness's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gguf import Keys

from malhae.errors import UserError
from malhae.eval.scoring import log_prob
from malhae.runtime.gguf_info import GGUFInfo
from malhae.runtime.llama import Batch, Context, Model, Owned
from malhae.runtime.settings import DEFAULT_BATCH, LoadOptions, Lora

SPARE = 512  # cache room for the choices' own tokens, beyond the prompt


@dataclass(frozen=True)
class Shape:
    """The context a Scorer makes, known from the GGUF header before loading (the offload planner needs it)."""

    n_ctx: int
    n_batch: int
    max_choices: int

    def options(self, load: LoadOptions) -> LoadOptions:
        """`load` with this shape, as the offload planner counts it: one cache of n_ctx tokens that every choice
        shares (unified), so one sequence's worth."""
        return replace(load, ctx=self.n_ctx, batch=self.n_batch, parallel=1)


@dataclass(frozen=True)
class Choice:
    """One scored continuation: its summed log-likelihood and whether greedy decoding would produce it."""

    loglik: float
    greedy: bool


def check_choices(context: list[int], continuations: list[list[int]], max_length: int,
                  window: str = "the model's window") -> None:
    """What every scorer refuses (local or on a server): nothing to condition on, an empty choice, a choice longer
    than the window."""
    if not context:
        raise ValueError("an empty context has nothing to condition on (the harness puts EOT there)")
    for cont in continuations:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        if len(cont) > max_length:
            raise UserError(f"a choice of {len(cont)} tokens does not fit {window} of {max_length} tokens")


class Scorer(Owned):
    """Scores continuations on one llama.cpp context; max_length is the model's window (the harness's max_length)."""

    def __init__(self, model: Model, *, max_length: int | None = None, max_choices: int = 4,
                 n_batch: int = DEFAULT_BATCH, threads: int | None = None, precise: bool = False, spare: int = SPARE,
                 lora: tuple[Lora, ...] = ()):
        """`lora`: adapters its context applies (checked against the model by the caller, as the engine does)."""
        self.model = model
        self.max_length = max_length or model.n_ctx_train
        self.max_choices = max_choices
        # the unified cache holds one prompt plus every choice's own tokens; `spare` is room for the choices
        self.ctx = Context(model, LoadOptions(ctx=self.max_length + spare, batch=n_batch, threads=threads,
                                              parallel=max_choices, lora=lora), precise=precise, unified_kv=True)
        self.spare = spare
        self._batch = Batch(n_batch, max_choices)

    @staticmethod
    def shape(info: GGUFInfo, max_choices: int) -> Shape:
        """What Scorer(model, max_choices=…) will allocate for the model `info` describes, with the defaults."""
        return Shape((info.arch_int(Keys.LLM.CONTEXT_LENGTH) or 2048) + SPARE, DEFAULT_BATCH, max_choices)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._batch.close()
            self._batch = None
        if getattr(self, "ctx", None) is not None:
            self.ctx.close()
            self.ctx = None


    def score(self, context: list[int], continuations: list[list[int]]) -> list[Choice]:
        """log p(continuation | context) for each continuation, the prompt decoded once per group of choices."""
        if len(continuations) > self.max_choices:
            raise ValueError(f"{len(continuations)} choices, the scorer was made for {self.max_choices}")
        check_choices(context, continuations, self.max_length)
        # where each choice's context starts after the harness's left truncation
        starts = [max(0, len(context) + len(c) - (self.max_length + 1)) for c in continuations]
        results: list[Choice | None] = [None] * len(continuations)
        for start in sorted(set(starts)):
            members = [i for i, s in enumerate(starts) if s == start]
            group = self._fit(members, continuations)
            for part in group:
                scored = self._score_group(context[start:], [continuations[i] for i in part])
                for i, choice in zip(part, scored, strict=True):
                    results[i] = choice
        return results  # type: ignore[return-value]

    def _fit(self, members: list[int], continuations: list[list[int]]) -> list[list[int]]:
        """Split a group so that each part's choice tokens fit the spare room of the cache (rarely needed)."""
        parts: list[list[int]] = [[]]
        used = 0
        for i in members:
            n = len(continuations[i])
            if parts[-1] and used + n > self.spare:
                parts.append([])
                used = 0
            parts[-1].append(i)
            used += n
        return parts

    def _score_group(self, prompt: list[int], conts: list[list[int]]) -> list[Choice]:
        """Decode prompt[:-1] once for all seqs, then per choice [prompt[-1]] + cont[:-1] with logits everywhere."""
        self.ctx.clear()
        seqs = list(range(len(conts)))
        entries: list[tuple[int, int, list[int], bool]] = [(tok, pos, seqs, False)
                                                            for pos, tok in enumerate(prompt[:-1])]
        last = len(prompt) - 1
        for seq, cont in enumerate(conts):
            inputs = [prompt[-1], *cont[:-1]]
            entries += [(tok, last + j, [seq], True) for j, tok in enumerate(inputs)]
        rows = self._decode(entries)  # one row per entry with logits, in order: choice 0's rows, then choice 1's…
        out: list[Choice] = []
        offset = 0
        for cont in conts:
            logits = rows[offset:offset + len(cont)]
            offset += len(cont)
            targets = np.asarray(cont, dtype=np.int64)
            out.append(Choice(float(log_prob(logits, targets).sum()),
                              bool((logits.argmax(axis=-1) == targets).all())))
        return out

    def _decode(self, entries: list[tuple[int, int, list[int], bool]]) -> np.ndarray:
        wanted = sum(1 for e in entries if e[3])
        out = np.empty((wanted, self.model.n_vocab), dtype=np.float32)
        filled = 0
        batch = self._batch
        n_batch = self.ctx.n_batch
        for start in range(0, len(entries), n_batch):
            chunk = entries[start:start + n_batch]
            batch.n_tokens = len(chunk)
            n_out = 0
            for i, (tok, pos, seqs, want) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.set_seqs(i, seqs)
                batch.wants_logits[i] = 1 if want else 0
                n_out += want
            self.ctx.decode(batch)
            if n_out:
                out[filled:filled + n_out] = self.ctx.output_logits(n_out)
                filled += n_out
        return out
