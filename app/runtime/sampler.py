"""llama.cpp's native sampler chain for one Sampling: the one place that turns settings into samplers, and the one
that applies a grammar.

Native chains (not Python sampling over numpy logits) because a chain samples straight from llama.cpp's logits buffer
without copying 30,080 floats per token into Python; the chat engine and the server's slots build theirs here, so the
same settings choose tokens the same way everywhere.

A grammar (Sampling.grammar: a JSON schema's or GBNF) is applied as llama.cpp's own tools apply it (common/sampling):
the chain samples without it, the grammar checks that one token, and only when it is rejected are all candidates
masked by the grammar and sampled again. Masking 30,080 candidates costs more than a token's decode on a fast model;
checking one costs nearly nothing, and inside a JSON string most tokens pass. A retry goes one step further
(`Sampler._retry`): the valid tokens that greedy or top-k would choose are among the likeliest few far more often
than not, so those are masked first and the whole vocabulary only when too few of them are valid — the same choice
either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import tempfile
import threading
from collections.abc import Sequence
from functools import partial

import llama_cpp as lc
import numpy as np

from malhae.errors import UserError
from malhae.runtime import llama
from malhae.runtime.grammar import Grammar
from malhae.runtime.settings import Sampling

# how many of the likeliest candidates a retry masks, tier by tier, before the whole vocabulary (each at least 4 ×
# top_k): the token greedy wants after a rejection is among the first 64 about half the time, and among the first
# 2,048 four times in five (the demo, a 12-property schema, greedy); 2,048 cost a fifth of all 30,080
RETRY_TIERS = (64, 2048)
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data's layout
_NEG_INF = -math.inf


def chain(vocab, n_vocab: int, s: Sampling, history: Sequence[int] = ()):
    """A new native sampler chain (free it with `free`); `history` (the prompt) is what the penalties see first, as
    in llama.cpp's own tools."""
    out = _adjusting(vocab, n_vocab, s, history)
    _choosing(out, s)
    return out


def _adjusting(vocab, n_vocab: int, s: Sampling, history: Sequence[int]):
    """A chain of the samplers that change logits by what came before (the end-token ban, the penalties)."""
    out = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lc.llama_sampler_chain_add
    if s.ignore_eos and s.grammar is None:  # with a grammar, the grammar decides where the answer ends
        eog = [t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t)]
        if eog:
            biases = (lc.llama_logit_bias * len(eog))(*[lc.llama_logit_bias(t, float("-inf")) for t in eog])
            add(out, lc.llama_sampler_init_logit_bias(n_vocab, len(eog), biases))
    penalised = s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0
    if penalised and s.repeat_last_n != 0:
        add(out, lc.llama_sampler_init_penalties(n_vocab, s.repeat_last_n, s.repeat_penalty, s.frequency_penalty,
                                                 s.presence_penalty))
    window = history[-s.repeat_last_n:] if s.repeat_last_n > 0 else history
    for token in window:
        lc.llama_sampler_accept(out, token)
    return out


def _choosing(out, s: Sampling) -> None:
    """Add the samplers that choose among the candidates (greedy, or top-k … temperature and a draw)."""
    add = lc.llama_sampler_chain_add
    if s.temperature <= 0:
        add(out, lc.llama_sampler_init_greedy())
        return
    if s.top_k > 0:
        add(out, lc.llama_sampler_init_top_k(s.top_k))
    if 0 < s.top_p < 1:
        add(out, lc.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0:
        add(out, lc.llama_sampler_init_min_p(s.min_p, 1))
    add(out, lc.llama_sampler_init_temp(s.temperature))
    seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
    add(out, lc.llama_sampler_init_dist(seed))


class Sampler:
    """One sequence's sampling: its chain, and its grammar's state when Sampling.grammar is set. `sample(ctx, i)`
    chooses (and accepts) the token after batch row i (-1: the last); bind it to a local on a hot path."""

    def __init__(self, vocab, n_vocab: int, s: Sampling, history: Sequence[int] = ()) -> None:
        self.grammar = self.pre = self.post = None
        self.tops: list = []
        if s.grammar is None:
            self.chain = chain(vocab, n_vocab, s, history)
            self.sample = partial(lc.llama_sampler_sample, self.chain)
            return
        self.chain = None
        try:
            self.grammar = grammar_sampler(vocab, s.grammar, s.grammar.source)
            # in two parts, so that a retry can narrow the candidates between them (see _retry)
            self.pre = _adjusting(vocab, n_vocab, s, history)
            self.post = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            _choosing(self.post, s)
            # the first sampler that chooses keeps this many: a retry among the likeliest finds them, or masks all
            self.keep = 1 if s.temperature <= 0 else max(s.top_k, 0)
            # top-k needs k valid tokens among the few, and where the grammar forces the structure there are
            # fewer than 40 in all: only greedy gains from the second tier
            tiers = RETRY_TIERS if self.keep == 1 else RETRY_TIERS[:1]
            sizes = sorted({max(n, 4 * self.keep) for n in tiers if max(n, 4 * self.keep) < n_vocab})
            self.tops = [lc.llama_sampler_init_top_k(n) for n in sizes] if self.keep else []
        except BaseException:
            self.free()
            raise
        self.sample = self._constrained
        self.n_vocab = n_vocab
        self.eos = lc.llama_vocab_eos(vocab)
        # without penalties nothing before the choosing samplers keeps state, and those keep none that a token
        # they chose and the grammar refused could spoil: the first try is then llama.cpp's own sample (its
        # candidates built in C), and Python's copy of the logits is made only for a retry
        self.native = lc.llama_sampler_chain_n(self.pre) == 0
        self._first = partial(lc.llama_sampler_sample, self.post)
        self._data = np.zeros(n_vocab, _TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._ptr = self._data.ctypes.data_as(lc.llama_token_data_p)
        self._all = lc.llama_token_data_array(self._ptr, n_vocab, -1, False)
        self._all_ref = ctypes.byref(self._all)
        self._one = lc.llama_token_data(0, 0.0, 0.0)
        self._single = lc.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        self._single_ref = ctypes.byref(self._single)

    def _fill(self, ctx, idx: int) -> None:
        """The candidates, from llama.cpp's logits of row `idx`, in the reused array, adjusted (penalties)."""
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        arr = self._all
        arr.data, arr.size, arr.selected, arr.sorted = self._ptr, self.n_vocab, -1, False
        lc.llama_sampler_apply(self.pre, self._all_ref)

    def _valid(self, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0
        single = self._single
        single.size, single.selected, single.sorted = 1, -1, False
        lc.llama_sampler_apply(self.grammar, self._single_ref)
        return one.logit != _NEG_INF

    def _constrained(self, ctx, idx: int) -> int:
        if self.native:
            token = self._first(ctx, idx)
        else:
            arr = self._all
            self._fill(ctx, idx)
            lc.llama_sampler_apply(self.post, self._all_ref)
            token = arr.data[arr.selected].id
        if not self._valid(token):
            token = self._retry(ctx, idx)
            if token is None:
                return self.eos  # nothing may follow: the grammar is complete (or stuck)
        if not self.native:  # (llama_sampler_sample accepted it into the chain already)
            lc.llama_sampler_accept(self.pre, token)
            lc.llama_sampler_accept(self.post, token)
        lc.llama_sampler_accept(self.grammar, token)
        return token

    def _retry(self, ctx, idx: int) -> int | None:
        """The token the grammar-masked candidates give, or None if the grammar allows none. The choosing samplers
        look only at their first `keep` candidates (greedy at one, top-k at k), so when at least that many of the
        likeliest few are valid, masking those few gives the same choice as masking all 30,080 (up to 400 times as
        dear): the tiers of RETRY_TIERS, then everything."""
        apply, arr = lc.llama_sampler_apply, self._all
        for top in self.tops:
            self._fill(ctx, idx)
            apply(top, self._all_ref)  # the likeliest, sorted
            apply(self.grammar, self._all_ref)
            arr.sorted = False  # masked ones now lie among them
            if int(np.count_nonzero(self._data["logit"][:arr.size] != _NEG_INF)) >= self.keep:
                return self._choose()
        self._fill(ctx, idx)
        apply(self.grammar, self._all_ref)
        return self._choose()

    def _choose(self) -> int | None:
        arr = self._all
        lc.llama_sampler_apply(self.post, self._all_ref)
        chosen = arr.data[arr.selected]
        return None if chosen.logit == _NEG_INF else chosen.id

    def free(self) -> None:
        for name in ("chain", "grammar", "pre", "post"):
            native = getattr(self, name, None)
            if native is not None:
                lc.llama_sampler_free(native)
                setattr(self, name, None)
        for native in getattr(self, "tops", ()):
            lc.llama_sampler_free(native)
        self.tops = []


# --- compiling a grammar with llama.cpp ----------------------------------------------------------------------

_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _stderr_captured(out: list[str]):
    """llama.cpp prints a GBNF syntax error with fprintf(stderr, …), followed by the whole grammar: catch it (file
    descriptor 2, for the moment of one parse) so the reason can be said in one line and the rest dropped. What
    other threads wrote meanwhile (a server's access log) is the caller's to pass on (`_pass_on`)."""
    with _stderr_lock, tempfile.TemporaryFile() as tmp:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to catch
            yield
            return
        try:
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read(1 << 16).decode("utf-8", "replace"))


def grammar_sampler(vocab, g: Grammar, where: str = "the grammar"):
    """A new llama.cpp grammar sampler for `g` (free it with llama_sampler_free), or a UserError with llama.cpp's
    reason in one line."""
    caught: list[str] = []
    logged: list[str] = []
    # a schema's grammar is valid by construction: only GBNF as given may make llama.cpp print
    captured = _stderr_captured(caught) if g.schema is None else contextlib.nullcontext()
    with llama.log_to(lambda level, text: logged.append(text)), captured:
        made = lc.llama_sampler_init_grammar(vocab, g.gbnf.encode(), b"root")
    printed = "".join(caught)
    reason = None if made else _reason(printed, "".join(logged))
    _pass_on(printed, g.gbnf)
    if made:
        return made
    raise UserError(f"{where} is not valid GBNF: {reason}")


def _pass_on(printed: str, source: str) -> None:
    """What was caught on stderr but was not llama.cpp's error (its line and its dump of the grammar): other
    threads' lines, written out again."""
    if not printed:
        return
    rest = "\n".join(line for line in printed.replace(source, "", 1).splitlines()
                     if line.strip() and "error parsing grammar:" not in line)
    if rest:
        with contextlib.suppress(OSError):
            os.write(2, (rest + "\n").encode("utf-8", "replace"))


def _reason(printed: str, logged: str) -> str:
    for line in printed.splitlines():
        if "error parsing grammar:" in line:
            reason = line.split("error parsing grammar:", 1)[1].strip()[:200]
            # llama.cpp ends with the rest of the source ("expecting ')' at <rest>"): nothing left is the end
            return reason + " the end" if reason.endswith(" at") else reason
    for line in logged.splitlines():
        if "grammar" in line and line.strip():
            return line.strip()[:200]
    return "llama.cpp could not parse it"


def check_grammar(vocab, g: Grammar, where: str = "the grammar") -> None:
    """Whether llama.cpp accepts `g` (with this model's vocabulary): a UserError with its reason if not."""
    lc.llama_sampler_free(grammar_sampler(vocab, g, where))
