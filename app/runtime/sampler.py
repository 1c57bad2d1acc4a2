"""llama.cpp's native sampler chain for one Sampling: the one place that turns settings into samplers.

Native chains (not Python sampling over numpy logits) because a chain samples straight from llama.cpp's logits buffer
without copying 30,080 floats per token into Python; the chat engine and the server's slots build theirs here, so the
same settings choose tokens the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp as lc

from malhae.runtime.settings import Sampling


def chain(vocab, n_vocab: int, s: Sampling, history: Sequence[int] = ()):
    """A new sampler chain (free it with `free`); `history` (the prompt) is what the penalties see first, as in
    llama.cpp's own tools."""
    out = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lc.llama_sampler_chain_add
    if s.ignore_eos:
        eog = [t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t)]
        if eog:
            biases = (lc.llama_logit_bias * len(eog))(*[lc.llama_logit_bias(t, float("-inf")) for t in eog])
            add(out, lc.llama_sampler_init_logit_bias(n_vocab, len(eog), biases))
    penalised = s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0
    if penalised and s.repeat_last_n != 0:
        add(out, lc.llama_sampler_init_penalties(n_vocab, s.repeat_last_n, s.repeat_penalty, s.frequency_penalty,
                                                 s.presence_penalty))
    if s.temperature <= 0:
        add(out, lc.llama_sampler_init_greedy())
    else:
        if s.top_k > 0:
            add(out, lc.llama_sampler_init_top_k(s.top_k))
        if 0 < s.top_p < 1:
            add(out, lc.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(out, lc.llama_sampler_init_min_p(s.min_p, 1))
        add(out, lc.llama_sampler_init_temp(s.temperature))
        seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
        add(out, lc.llama_sampler_init_dist(seed))
    window = history[-s.repeat_last_n:] if s.repeat_last_n > 0 else history
    for token in window:
        lc.llama_sampler_accept(out, token)
    return out


def free(sampler) -> None:
    lc.llama_sampler_free(sampler)
