"""A slot of the batching scheduler (app/runtime/batching.py), and whose turn it is when slots want other adapters.

One llama.cpp context applies one LoRA adapter set per llama_decode (`Context.set_adapters`), so slots whose requests
carry the same set decode together and different sets take turns. A turn goes to the set that has waited longest
since its last one (a set new to the scheduler waits from its oldest request's start): with k sets at work, each gets
a decode at least every k steps, so no stream starves however the others come and go.

A slot's cache holds K/V computed with the set it last ran (`Slot.adapters`); a request with another set reuses none
of it, and the same prompt under two sets is two different caches.
"""

from __future__ import annotations

import time

from malhae.runtime.events import Job, TokenLogprob
from malhae.runtime.settings import Lora
from malhae.runtime.step import Step

Adapters = tuple[Lora, ...]


def normal(loras: tuple[Lora, ...]) -> Adapters:
    """A set as it is applied and compared: the adapters at scale 0 dropped (they change nothing), order kept."""
    return tuple(lora for lora in loras if lora.scale != 0)


class Slot:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cache: list[int] = []  # tokens whose K/V this sequence holds, in order
        self.adapters: Adapters = ()  # the LoRA set (normal) the cache was computed with
        self.job: Job | None = None
        self.chain = None
        self.step: Step | None = None  # the job's end token, stop texts, length, and generated count
        self.fed = 0  # prompt tokens in the cache (prefill is done when it reaches len(job.tokens))
        self.pending: int | None = None  # the last sampled token, to be decoded next step
        self.cached = 0
        self.row = -1  # batch index of this slot's sampling row in the current step, -1 when none
        self.echo_rows: list[tuple[int, int]] = []  # (batch index, position) of prompt rows wanting logits
        self.prompt_lp: list[TokenLogprob] = []
        # the log-probabilities of cache[:len(known)], kept from the last echo (with `known_top` alternatives each):
        # an echo sharing that prefix reuses them, as lm-eval's choices of one question share their context
        self.known: list[TokenLogprob] = []
        self.known_top = 0
        self.started = 0.0
        self.ttft = 0.0
        self.last_used = 0.0

    @property
    def busy(self) -> bool:
        return self.job is not None


class Turns:
    """Which adapter set the next decode runs: the one among the busy slots' sets that has waited longest."""

    def __init__(self) -> None:
        self.served: dict[Adapters, float] = {}  # when each set at work last had a decode

    def choose(self, slots: list[Slot]) -> Adapters | None:
        """The set to decode now (None: no slot is busy); only busy slots of that set take part in this step."""
        since: dict[Adapters, float] = {}
        for slot in slots:
            if slot.busy:
                waited = self.served.get(slot.adapters, slot.started)
                since[slot.adapters] = min(since.get(slot.adapters, waited), waited)
        if not since:
            return None
        chosen = min(since, key=since.__getitem__) if len(since) > 1 else next(iter(since))
        self.served = {s: t for s, t in self.served.items() if s in since}  # a set that comes back waits afresh
        self.served[chosen] = time.perf_counter()
        return chosen
