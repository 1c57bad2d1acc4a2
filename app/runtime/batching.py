"""Continuous batching: several requests generate at once in one llama.cpp context, one llama_decode per step.

Why: one stream on a CPU or GPU leaves most of the hardware idle (decode is bound by reading the weights once per
step, whatever the batch holds), so N streams in one decode cost little more than one. Each step holds one token for
every generating sequence plus chunks of the prompts of newly admitted requests; a request starts at the next step,
never waiting for the running ones to finish.

Each slot is one llama.cpp sequence with its own part of the KV cache (`Engine(n_seq=N)`) and its own native sampler
chain. A slot remembers the tokens in its cache after its request ends, and a new request goes to the free slot that
shares the longest prefix with it: a chat client that resends the whole conversation pays for its new turn only.
Requests may carry their own LoRA adapter set (Job.adapters): one decode applies one set, so slots of the same set
decode together and the sets take turns (app/runtime/slots.py), and a cache is reused only under its own set.

The scheduler runs in one thread that alone touches the context; `submit` and `Job.cancel` may be called from any
thread. Results go out through each job's `emit` callback, called on the scheduler thread (keep it short); the job
and its events are in app/runtime/events.py, and each token goes through the engine's own step (app/runtime/step.py).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from dataclasses import replace

import llama_cpp as lc
import numpy as np

from malhae.errors import UserError
from malhae.runtime import logprobs as lp
from malhae.runtime import sampler
from malhae.runtime.engine import Engine, common_prefix
from malhae.runtime.events import Done, Event, Job, Prompt, Token, TokenLogprob
from malhae.runtime.llama import Batch
from malhae.runtime.slots import Adapters, Slot, Turns, normal
from malhae.runtime.step import Step, StopReason

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; the legacy completions limit is 5, and lm-eval asks for 1
GATHER_SECONDS = 0.005  # an idle scheduler waits this long for requests arriving together (see Scheduler._gather)


class Busy(Exception):
    """The queue is full: try again later (HTTP 503 with Retry-After)."""


class Scheduler:
    """N slots on one Engine (made with n_seq=N); at most `queue` jobs wait for a slot, more are refused (Busy)."""

    def __init__(self, engine: Engine, *, queue: int = 64, gather: float | None = None) -> None:
        """`gather`: seconds an idle scheduler waits for requests arriving together; None adapts it (see _gather)."""
        self.engine = engine
        self.model = engine.model
        self.context = engine.ctx
        self.ctx = engine.ctx.ptr
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_slot_ctx = engine.n_ctx
        self.n_batch = engine.n_batch
        self.slots = [Slot(i) for i in range(engine.options.parallel)]
        self.queue_limit = queue
        self.gather = gather
        self._prompt_step = 0.0  # seconds the last decode holding prompt tokens took
        self.waiting: deque[Job] = deque()
        self.turns = Turns()
        self._cv = threading.Condition()
        self._stop = False
        self._batch = Batch(self.n_batch)
        self.steps = 0  # decodes done (tests check that requests really shared steps)
        self._thread = threading.Thread(target=self._run, name="malhae-scheduler", daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue these jobs together (the n choices of one request), or refuse them all with Busy."""
        with self._cv:
            if self._stop:
                raise Busy("the server is shutting down")
            free = sum(not s.busy for s in self.slots)
            if len(self.waiting) + len(jobs) > self.queue_limit + free:
                raise Busy(f"{len(self.waiting)} requests are already waiting for a slot")
            self.waiting.extend(jobs)
            self._cv.notify()

    def wake(self) -> None:
        """Look at cancelled jobs now rather than at the next step."""
        with self._cv:
            self._cv.notify()

    @property
    def active(self) -> int:
        return sum(s.busy for s in self.slots)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for slot in self.slots:
            self._release(slot)
        self._batch.close()

    # --- the scheduler thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                idle = not any(s.busy for s in self.slots)
                while not self._stop and not self.waiting and idle:
                    self._cv.wait()
                if idle:
                    self._gather()
                if self._stop:
                    break
                admitted = self._admit()
            try:
                for slot, job in admitted:
                    self._start(slot, job)
                self._step()
            except Exception as e:  # never leave a job waiting for ever: fail the running ones and go on
                for slot in self.slots:
                    if slot.busy:
                        # what the cache holds is no longer known for sure: start this sequence afresh
                        lc.llama_memory_seq_rm(self.mem, slot.seq, 0, -1)
                        slot.cache, slot.known, slot.fed = [], [], 0
                        self._finish(slot, StopReason.ERROR,
                                     f"internal error in the scheduler ({type(e).__name__}: {e})")
        for job in self.waiting:
            self._send(job, Done(StopReason.ERROR, len(job.tokens), 0, 0, "", "the server is shutting down"))
        self.waiting.clear()

    def _gather(self) -> None:
        """Idle, a request arrived: wait a moment for others arriving with it (called holding the lock).

        Requests of a burst (a client's n parallel calls, lm-eval's concurrent batch) come microseconds to
        milliseconds apart; started one step apart, the first one's prompt is evaluated alone and the others wait a
        whole prompt evaluation longer for their first token. The wait costs a lone request that much, so it is a
        tenth of what the last prompt step took, at most GATHER_SECONDS: 5 ms beside a CPU's 0.6 s prompt step,
        next to nothing beside a GPU's (measured on 2 cores, 4 clients of the 1.3B Q4_K_M: all four first tokens
        at once in 2 of 3 rounds, TTFT p95 2.65 s against llama-server's 2.99)."""
        window = self.gather if self.gather is not None else min(GATHER_SECONDS, 0.1 * self._prompt_step)
        end = time.perf_counter() + window
        free = len(self.slots)
        while not self._stop and len(self.waiting) < free:
            left = end - time.perf_counter()
            if left <= 0:
                break
            self._cv.wait(left)

    def _admit(self) -> list[tuple[Slot, Job]]:
        """Give waiting jobs free slots (called holding the lock): the slot sharing the longest prefix with the
        job's prompt, else the one unused longest."""
        out = []
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            free = [s for s in self.slots if not s.busy and all(s is not t for t, _ in out)]
            if not free:
                break
            self.waiting.popleft()
            best = max(free, key=lambda s: (self._reusable(s, job), -s.last_used))
            best.job = job  # taken now, so that the next job in the queue does not choose it too
            out.append((best, job))
        return out

    def _adapters(self, job: Job) -> Adapters:
        return normal(self.engine.options.lora if job.adapters is None else job.adapters)

    def _reusable(self, slot: Slot, job: Job) -> int:
        """How many of `slot`'s cached tokens `job` keeps (at least its last prompt token is evaluated again): none
        when the cache was computed with other adapters.

        An echo needs a log-probability for every prompt token: it keeps a cached position only if that token's
        value is known (`slot.known`, with as many alternatives as it asks for), and the token after the kept ones
        too, since the row that predicts it is not evaluated again."""
        if slot.adapters != self._adapters(job):
            return 0
        shared = common_prefix(slot.cache, job.tokens)
        if not job.echo:
            return min(shared, len(job.tokens) - 1)
        if slot.known_top < (job.logprobs or 0):
            return 0
        # kept: positions < c; known values needed for positions ≤ c, which must be the same tokens (c < shared)
        return max(0, min(shared - 1, len(job.tokens) - 1, len(slot.known) - 1))

    def _start(self, slot: Slot, job: Job) -> None:
        # min_new: the end token is kept away (ignore_eos) until then; _take swaps in the plain chain
        held = replace(job.sampling, ignore_eos=True) if job.min_new else job.sampling
        try:  # first, so that a grammar llama.cpp refuses fails this job alone, before the slot is touched
            chain = sampler.Sampler(self.model.vocab, self.model.n_vocab, held, job.tokens)
        except UserError as e:
            slot.job = None  # _admit took the slot for it
            self._send(job, Done(StopReason.ERROR, len(job.tokens), 0, 0, "", str(e)))
            return
        common = self._reusable(slot, job)
        slot.adapters = self._adapters(job)
        # the prompt cache holds states of the engine's own adapters only
        own = slot.adapters == normal(self.engine.options.lora)
        restored = self.engine.restore(job.tokens, common, slot.seq) if own and not job.echo else None
        if restored is not None:
            slot.cache, common = restored
            slot.known = []
        lc.llama_memory_seq_rm(self.mem, slot.seq, common, -1)
        reused = [TokenLogprob(e.token, e.logprob, e.top[:job.logprobs or 0]) for e in slot.known[:common + 1]]
        slot.known = slot.known[:common]
        slot.cache = slot.cache[:common]
        slot.job = job
        slot.fed = common
        slot.cached = common
        slot.pending = None
        # check_request's max_new is at most what the context has left (so it ends with LENGTH); the room guards a
        # Job made otherwise
        max_new = min(job.max_new, self.n_slot_ctx - len(job.tokens))
        slot.step = Step(self.model.vocab, job.sampling.stop, max_new, job.max_new, answer=job.sampling.answer,
                         min_new=job.min_new)
        slot.prompt_lp = []
        slot.started = time.perf_counter()
        slot.ttft = 0.0
        slot.chain = chain
        if job.echo:
            slot.prompt_lp = reused if common else [TokenLogprob(job.tokens[0], None)]

    def _step(self) -> None:
        for slot in self.slots:
            if slot.busy and slot.job.cancelled:
                self._release(slot)
        turn = self.turns.choose(self.slots)  # the adapter set of this step; the other sets' slots wait for theirs
        if turn is None:
            return
        self.context.set_adapters(turn)  # nothing to do when it is the last step's
        alone = self._speculating()
        if alone is not None:
            self._speculate(alone)
            return
        batch = self._batch
        n = 0
        # one token for every generating sequence first, so that running answers never wait for new prompts (a
        # batch always has room for them: the engine makes n_batch at least the number of slots)
        for slot in self.slots:
            slot.row = -1
            slot.echo_rows = []
            if slot.busy and slot.adapters != turn:
                continue
            if slot.busy and slot.pending is not None:
                self._put(n, slot.pending, len(slot.cache), slot.seq, True)
                slot.row = n
                slot.cache.append(slot.pending)
                slot.pending = None
                n += 1
        # then prompt chunks, in order of arrival, as far as the batch has room
        generating = n
        for slot in sorted((s for s in self.slots if s.busy and s.adapters == turn and s.fed < len(s.job.tokens)),
                           key=lambda s: s.job.submitted):
            room = self.n_batch - n
            if room <= 0:
                break
            tokens = slot.job.tokens
            end = min(len(tokens), slot.fed + room)
            for pos in range(slot.fed, end):
                last = pos == len(tokens) - 1
                want = last or slot.job.echo
                self._put(n, tokens[pos], pos, slot.seq, want)
                if slot.job.echo and not last:
                    slot.echo_rows.append((n, pos))
                if last:
                    slot.row = n
                n += 1
            slot.cache.extend(tokens[slot.fed:end])
            slot.fed = end
        if n == 0:
            return
        prompt_tokens = n - generating
        batch.n_tokens = n
        started = time.perf_counter()
        rc = lc.llama_decode(self.ctx, batch.ptr)
        self.steps += 1
        if prompt_tokens:
            self._prompt_step = time.perf_counter() - started
        if rc != 0:
            for slot in self.slots:
                if slot.busy and slot.adapters == turn and (slot.row >= 0 or slot.echo_rows
                                                            or slot.fed < len(slot.job.tokens)):
                    slot.cache, slot.known = [], []
                    lc.llama_memory_seq_rm(self.mem, slot.seq, 0, -1)
                    self._finish(slot, StopReason.ERROR, f"llama.cpp could not evaluate a batch of {n} tokens "
                                                         f"(llama_decode → {rc})")
            return
        for slot in self.slots:
            if slot.busy and slot.echo_rows:
                self._prompt_logprobs(slot)
            if slot.busy and slot.row >= 0:
                self._sample(slot)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.ptr.seq_id[i][0] = seq
        b.wants_logits[i] = logits

    def _rows(self, first: int, count: int) -> np.ndarray:
        """The logits of batch rows first … first+count-1 (all wanting logits, so consecutive in llama.cpp's output
        buffer, which it keeps in batch order): a view [count, n_vocab]."""
        n_vocab = self.model.n_vocab
        base = lc.llama_get_logits_ith(self.ctx, first)
        if count > 1:
            last = lc.llama_get_logits_ith(self.ctx, first + count - 1)
            if ctypes.addressof(last.contents) - ctypes.addressof(base.contents) != (count - 1) * n_vocab * 4:
                return np.stack([self._rows(first + j, 1)[0] for j in range(count)])  # not consecutive after all
        return np.ctypeslib.as_array(base, shape=(count, n_vocab))

    def _logprobs(self, first: int, targets: list[int], n_top: int) -> list[TokenLogprob]:
        values, tops = lp.score_rows(self._rows(first, len(targets)), np.asarray(targets), n_top)
        return [TokenLogprob(t, float(v), tuple(top)) for t, v, top in zip(targets, values, tops, strict=True)]

    def _prompt_logprobs(self, slot: Slot) -> None:
        tokens = slot.job.tokens
        first = slot.echo_rows[0][0]
        slot.prompt_lp += self._logprobs(first, [tokens[pos + 1] for _, pos in slot.echo_rows], slot.job.logprobs or 0)

    def _sample(self, slot: Slot) -> None:
        job, step = slot.job, slot.step
        if step.n == 0 and job.echo:  # the prompt is complete: its log-probabilities go out first
            self._send(job, Prompt(tuple(slot.prompt_lp)))
            slot.known, slot.known_top = slot.prompt_lp, job.logprobs or 0
            slot.prompt_lp = []
        if step.reason is not None:  # max_tokens 0: the prompt was all that was asked for
            self._finish(slot, step.reason)
            return
        token = slot.chain.sample(self.ctx, slot.row)
        logprob = self._logprobs(slot.row, [token], job.logprobs)[0] if job.logprobs is not None else None
        self._take(slot, token, logprob)

    def _take(self, slot: Slot, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Hand out a sampled token; False when that ended the job (its slot is free again)."""
        job, step = slot.job, slot.step
        if step.n == 0:
            slot.ttft = time.perf_counter() - job.submitted  # waiting in the queue counts: the client waited
        text = step.take(token)
        reason = step.reason
        if reason is None and step.n == job.min_new and not job.sampling.ignore_eos and job.sampling.grammar is None:
            slot.chain.free()  # the end token may come now (a grammar's state is kept: it ends the answer)
            slot.chain = sampler.Sampler(self.model.vocab, self.model.n_vocab, job.sampling, [*slot.cache, token])
        if reason is not StopReason.EOS:  # an end token is not handed out
            self._send(job, Token(token, text, logprob))
        if reason is None:
            slot.pending = token
            return True
        self._finish(slot, reason)
        return False

    def _speculating(self) -> Slot | None:
        """The slot to speculate for in this step, if any: the only busy one, generating, with nothing waiting.

        Only a lone stream: with several, one decode already carries a token of each, and on a CPU every extra row
        costs nearly a token's time, so draft rows would slow the others down (measured in docs/benchmarks.md). A
        request for log-probabilities is not speculated either (each row's would have to be read before the next
        sample)."""
        spec = self.engine.speculator
        if spec is None or self.waiting:
            return None
        busy = [s for s in self.slots if s.busy]
        if len(busy) != 1:
            return None
        slot = busy[0]
        job = slot.job
        if slot.pending is None or job.cancelled or job.logprobs is not None or job.echo:
            return None
        return slot if slot.step.n >= job.min_new else None  # before min_new, one token at a time (_take's swap)

    def _speculate(self, slot: Slot) -> None:
        """Decode the slot's pending token with a draft (app/runtime/speculate.py), then hand out what was
        accepted and the one sample after it, as _sample would have, one by one."""
        token, slot.pending = slot.pending, None
        slot.cache.append(token)
        try:
            sampled = self.engine.speculator.advance(self.ctx, slot.chain, slot.seq, slot.cache, slot.step.draft_room)
        except UserError as e:
            slot.cache, slot.known = [], []
            lc.llama_memory_seq_rm(self.mem, slot.seq, 0, -1)
            self._finish(slot, StopReason.ERROR, str(e))
            return
        self.steps += 1
        slot.cache.extend(sampled[:-1])  # the accepted draft is in the KV cache, the last sample not yet
        for t in sampled:
            if not self._take(slot, t):
                return

    def _finish(self, slot: Slot, reason: StopReason, error: str = "") -> None:
        job, step = slot.job, slot.step
        if job is None:
            return
        if step is None:  # failed before it started (_start raised for another slot admitted with it)
            step = Step(self.model.vocab, (), 0, 0)
        elif reason is not StopReason.ERROR:
            tail = step.finish()
            if tail:
                self._send(job, Token(-1, tail))
        self._send(job, Done(reason, len(job.tokens), step.n, slot.cached, step.text, error,
                             time.perf_counter() - slot.started, slot.ttft, step.matched))
        self._release(slot)
        if reason is not StopReason.ERROR and slot.adapters == normal(self.engine.options.lora):
            reading = job.submitted + slot.ttft - slot.started  # its prompt's evaluation (shared with others')
            self.engine.save(slot.cache, len(job.tokens) - slot.cached, reading, slot.seq)

    def _release(self, slot: Slot) -> None:
        if slot.chain is not None:
            slot.chain.free()
            slot.chain = None
        if slot.job is not None and slot.fed < len(slot.job.tokens):
            # a half-evaluated prompt stays a valid prefix: keep exactly what the cache holds
            slot.cache = slot.cache[:slot.fed]
        slot.job = None
        slot.step = None
        slot.pending = None
        slot.last_used = time.perf_counter()

    def _send(self, job: Job, event: Event) -> None:
        if job.cancelled:
            return
        try:
            job.emit(event)
        except Exception:  # a receiver that cannot take it is gone: stop its generation
            job.cancel()


def check_request(engine: Engine, tokens: list[int], max_new: int | None) -> int:
    """How many tokens a request may generate in a slot (`max_new` None: up to the end of the context); a prompt or a
    max_tokens the context cannot take is a UserError."""
    engine.check_prompt(tokens)
    n_ctx = engine.n_ctx
    room = n_ctx - len(tokens)
    if max_new is None:
        return room
    if max_new > room:
        raise UserError(f"max_tokens {max_new} does not fit: the prompt is {len(tokens)} tokens and the context "
                        f"{n_ctx}, which leaves {room}")
    return max_new
