"""The inference engine every front end uses: load a GGUF, stream text, measure.

Built on llama-cpp-python's low-level API, in a loop kept as tight as the reference measurement
(../shared/tools/lowlevel_loop.py): sample with llama.cpp's native sampler chain, turn the token into bytes with
llama_token_to_piece into a reused buffer, decode the next token with llama_decode. The high-level `llama_cpp.Llama`
stream keeps about a third of llama.cpp's GPU decode speed, so it is not used.

The engine keeps track of the tokens in its KV cache and evaluates only what a new prompt adds to them, so a chat turn
costs its own tokens, not the whole conversation's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import llama_cpp as lc
from gguf import Keys

from malhae.errors import UserError
from malhae.runtime import hardware, kv, llama, lora, offload, sampler
from malhae.runtime.gguf_info import GGUFInfo, check_shape, read_info
from malhae.runtime.kv import common_prefix
from malhae.runtime.settings import LoadOptions, Sampling, check, context_size
from malhae.runtime.speculate import Counts, Speculator
from malhae.runtime.step import Step, StopReason

SUPPORTED_ARCHITECTURES = ("gptneox",)
Notify = Callable[[str], None]


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, already in the KV cache (not evaluated again)
    restored_tokens: int = 0  # of cached_tokens, restored from the prompt cache on disk
    restore_seconds: float = 0.0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0  # after the first token
    ttft: float = 0.0  # time to first token: prompt evaluation + first sample
    stop_reason: StopReason | str = ""  # "" until an answer ended
    draft_proposed: int = 0  # speculative decoding: drafted tokens verified, and how many of them were kept
    draft_accepted: int = 0

    @property
    def prompt_tps(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # tokens after the first, over the time after it: none (0 or 1 generated) is 0, never negative
        after_first = self.generated_tokens - 1
        return after_first / self.decode_seconds if self.decode_seconds > 0 and after_first > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain values for JSON (`--json`, bench files): stop_reason as its plain word, not the Enum."""
        return asdict(self) | {"stop_reason": str(self.stop_reason), "prompt_tps": round(self.prompt_tps, 2),
                               "decode_tps": round(self.decode_tps, 2)}


def check_prompt(tokens: list[int], n_ctx: int, *, server: bool = False) -> None:
    """The one rule for a prompt, local or on a server: not empty, and room left for at least one more token."""
    if not tokens:
        raise UserError("the prompt is empty")
    check_fits(len(tokens), n_ctx, server=server)


def check_fits(n_prompt: int, n_ctx: int, *, server: bool = False) -> None:
    if n_prompt >= n_ctx:
        whose, fix = ("the server's context", "shorten it") if server else ("the context", "shorten it or raise --ctx")
        raise UserError(f"the prompt is {n_prompt} tokens, {n_prompt - n_ctx + 1} more than {whose} of {n_ctx} can "
                        f"take with room for an answer; {fix}")


def check_model_file(path: Path) -> GGUFInfo:
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as e:  # too long a name, a symlink loop, a component that is a file
        raise UserError(f"cannot open model file {str(path)[:200]}: {e.strerror or e}") from None
    if not path.exists():
        # every command names the model its own way (--model, /model, eval compare's A and B): the hint names none
        raise UserError(f"model file {path} does not exist; give the path of a .gguf file or a name from `malhae "
                        "models` (make one with `malhae convert`)")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a model; give a .gguf file (convert a checkpoint folder with "
                        "`malhae convert`)")
    info = read_info(path)
    if info.metadata.get(Keys.General.TYPE) == "adapter":
        raise UserError(f"{path.name} is a LoRA adapter, not a model: run it on the model it adapts, -m BASE --lora "
                        f"{path.name}")
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path.name} is a {info.architecture or 'unknown'} model; malhae runs GPT-NeoX models "
                        "(the Polyglot-Ko family)")
    check_shape(info)
    return info


class Engine:
    remote = False  # the local implementation of app.runtime.backend.Backend

    def __init__(self, options: LoadOptions, *, notify: Notify | None = None) -> None:
        """Load `options.model` as `options` say. `options.ctx` is each sequence's context; `options.parallel`
        sequences (the server's slots) each get their own part of one KV cache, so memory is parallel × ctx tokens.
        `options.draft` turns speculative decoding on (see set_draft). What was left to be decided (ctx, batch,
        threads) is resolved here and kept in `self.options`."""
        if options.model is None:
            raise ValueError("LoadOptions.model is None: resolve --model first")
        self.path = options.model
        self.info = check_model_file(self.path)
        self.notify = notify or (lambda message: None)
        llama.init(options.verbose)
        ctx = context_size(options.ctx, self.info.arch_int(Keys.LLM.CONTEXT_LENGTH))
        # llama.cpp needs room for one output per sequence in a batch (else it aborts the process: GGML_ASSERT
        # n_outputs_max), and n sequences of a context each may well be more than one context's tokens
        self.options = replace(options, ctx=ctx, batch=max(min(options.batch, ctx), options.parallel),
                               threads=options.threads or hardware.physical_cores())
        kv.check_types(options.kv_cache_k, options.kv_cache_v, options.flash_attn, self.info.head_dim)  # before loading
        self.adapters = lora.check(options.lora, self.info)  # an adapter of another model: said before loading
        for note in filter(None, (lora.base_note(a, self.info) for a in self.adapters)):
            self.notify(note)
        self.plan = offload.choose(self.info, self.options, notify=self.notify)
        self.n_gpu_layers = self.plan.n_gpu_layers
        self.model: llama.Model | None = None
        self.ctx = None
        self._load()
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab
        self.cache: list[int] = []  # tokens whose K/V are in the context, in order
        self.generated: list[int] = []
        self.stats = Stats()
        self.speculator: Speculator | None = None
        self.prompt_cache = self._prompt_cache(self.options)
        if options.speculates:
            try:
                self.set_draft(self.options)
            except BaseException:
                self.close()
                raise

    @property
    def n_ctx(self) -> int:
        """Tokens one prompt and its answer may take: options.ctx, under llama.cpp's name (the Backend protocol's)."""
        return self.options.ctx

    @property
    def n_batch(self) -> int:
        """options.batch, under llama.cpp's name, as `malhae info` reports it."""
        return self.options.batch

    def set_draft(self, options: LoadOptions) -> None:
        """Speculate as `options.draft` and `options.draft_max` say from the next generation on: "lookup" (n-grams of
        the prompt and answer), a Path to a draft model of the same vocabulary, or None/"off" for plain decoding."""
        from malhae.runtime.draft import DraftModel, Lookup

        draft, draft_max = options.draft, check("draft_max", options.draft_max)
        old = self.speculator
        if not options.speculates:
            self.speculator = None
            if old is not None:
                old.close()
        elif old is not None and old.source == draft:  # the same drafter, another length: nothing to load again
            old.resize(draft_max)
        else:
            if draft == "lookup":
                drafter = Lookup()
            else:
                # the draft model runs beside this one: one sequence, offloaded only if this one is
                helper = Engine(replace(self.options, model=Path(draft), parallel=1, draft=None, prompt_cache=None,
                                        lora=(), gpu_layers="auto" if self.n_gpu_layers else 0), notify=self.notify)
                try:
                    drafter = DraftModel(helper, self.model)
                except BaseException:
                    helper.close()
                    raise
            self.speculator = Speculator(drafter, draft_max, source=draft)
            if old is not None:
                old.close()
        self.options = replace(self.options, draft=draft, draft_max=draft_max)  # once it took effect

    def set_lora(self, loras: tuple) -> None:
        """Apply these adapters (app.runtime.settings.Lora) from the next generation on, checked first. The cached
        tokens' K/V were computed with the old ones, so nothing of them is reused, and the prompt cache moves to
        the states of the new set."""
        loras = tuple(loras)
        if loras == self.options.lora:
            return
        infos = lora.check(loras, self.info)
        self.ctx.set_adapters(loras)
        self.ctx.clear()
        self.cache = []
        self.adapters = infos
        self.options = replace(self.options, lora=loras)
        if self.prompt_cache is not None:
            self.prompt_cache.wait()
            self.prompt_cache = self._prompt_cache(self.options)

    @property
    def draft(self) -> str:
        """What drafts, for /show and /stats: "off", "lookup" or the draft model's file name."""
        return self.speculator.name if self.speculator else "off"

    def _prompt_cache(self, options: LoadOptions):
        """The saved states of this model file and setup, when options.prompt_cache names their folder."""
        from malhae.runtime import prompt_cache

        if options.prompt_cache is None:
            return None
        setup = {"kv": [options.kv_cache_k, options.kv_cache_v], "flash_attn": options.flash_attn,
                 "adapters": lora.identity(options.lora)}
        return prompt_cache.PromptCache(options.prompt_cache, prompt_cache.folder_for(options.prompt_cache, self.path,
                                        setup), self.path.name, int(options.prompt_cache_max * 2**30))

    # --- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> None:
        plan = self.plan
        while True:
            layers = plan.n_gpu_layers
            try:
                self.model = llama.Model.planned(self.options, plan)
                self.ctx = llama.Context(self.model, self.options)
                break
            except UserError:
                if self.model is not None:
                    self.model.close()
                    self.model = None
                if layers <= 0:
                    raise
                plan = offload.fewer(plan, layers * 3 // 4)
                self.notify(f"not enough GPU memory for {layers} layers; retrying with {plan.n_gpu_layers}")
        self.plan = plan
        self.n_gpu_layers = plan.n_gpu_layers

    def close(self) -> None:
        saved = getattr(self, "prompt_cache", None)
        if saved is not None:
            saved.wait()  # a state being written is finished, not cut off
        speculator = getattr(self, "speculator", None)
        if speculator is not None:
            speculator.close()
            self.speculator = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self.model is not None:
            self.model.close()
            self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- text ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.model.token_bytes(t, special=False) for t in tokens).decode("utf-8", "replace")

    @property
    def name(self) -> str:
        return self.info.name or self.path.stem

    @property
    def where(self) -> str:
        """Where it runs, briefly (the chat's banner)."""
        return f"{self.path.name}, {self.plan.describe(detail=False)}"

    @property
    def location(self) -> str:
        """Where it runs, in full (/show)."""
        where = self.plan.where if self.n_gpu_layers else f"CPU, {self.options.threads} threads"
        return f"{self.path} ({where})"

    def chat_template_info(self) -> tuple[str | None, str, str]:
        """(the GGUF's own chat template, BOS text, EOS text), for app.runtime.templates.for_engine."""
        from gguf import Keys

        def text(key: str) -> str:
            token = self.info.metadata.get(key)
            return self.model.token_bytes(int(token), special=True).decode("utf-8", "replace") \
                if isinstance(token, int) else ""

        source = self.info.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
        return (source if isinstance(source, str) else None, text(Keys.Tokenizer.BOS_ID),
                text(Keys.Tokenizer.EOS_ID))

    def check_prompt(self, tokens: list[int]) -> None:
        """A prompt the context can take with room for at least one more token (chat, one-shots, the server)."""
        check_prompt(tokens, self.n_ctx)

    def check_fits(self, n_prompt: int) -> None:
        check_fits(n_prompt, self.n_ctx)

    # --- generation ------------------------------------------------------------------------------------------

    def _sampler(self, s: Sampling, history: list[int]) -> sampler.Sampler:
        return sampler.Sampler(self.vocab, self.n_vocab, s, history)

    def evaluate(self, tokens: list[int]) -> None:
        """Bring the KV cache to exactly `tokens`, evaluating only what is not cached (at least the last token): what
        the KV cache holds, or more from the prompt cache on disk."""
        common = min(common_prefix(self.cache, tokens), len(tokens) - 1)
        restored = self.restore(tokens, common)
        if restored is not None:
            self.cache, common = restored
        lc.llama_memory_seq_rm(lc.llama_get_memory(self.ctx.ptr), 0, common, -1)
        self.cache = self.cache[:common]
        for start in range(common, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            arr = (lc.llama_token * len(chunk))(*chunk)
            rc = lc.llama_decode(self.ctx.ptr, lc.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self.cache = []
                raise UserError(f"llama.cpp could not evaluate the prompt (llama_decode returned {rc})")
            self.cache.extend(chunk)
        self.stats.cached_tokens = common

    def restore(self, tokens: list[int], common: int, seq: int = 0) -> tuple[list[int], int] | None:
        """Restore into sequence `seq` the saved state sharing the longest prefix with `tokens`, when it holds at
        least MIN_TOKENS more than the `common` tokens the KV cache keeps: (the tokens the sequence now holds, how
        many of them `tokens` keeps), or None with the sequence as it was. The engine's and the server's slots' one
        way in (app.runtime.batching)."""
        from malhae.runtime import prompt_cache

        if self.prompt_cache is None or len(tokens) - 1 - common < prompt_cache.MIN_TOKENS:
            return None
        start = time.perf_counter()
        found = self.prompt_cache.find(tokens, at_least=common + prompt_cache.MIN_TOKENS)
        state = self.prompt_cache.load(found[0]) if found else None
        if state is None:
            return None
        entry, n = found
        if not self.ctx.set_seq_state(state, seq):
            prompt_cache.remove(entry.path)
            return [], 0  # the sequence was emptied
        keep = min(n, len(tokens) - 1)
        self.stats.restored_tokens, self.stats.restore_seconds = keep, time.perf_counter() - start
        return list(entry.tokens), keep

    def save(self, cached: list[int], evaluated: int, seconds: float, seq: int = 0) -> None:
        """Save sequence `seq`'s state (it holds `cached`) when reading its prompt (`evaluated` tokens in `seconds`)
        cost more than restoring it will (prompt_cache.worth_saving): only what was expensive to read earns disk."""
        from malhae.runtime import prompt_cache

        if self.prompt_cache is None or evaluated < prompt_cache.MIN_TOKENS or not cached:
            return
        if prompt_cache.worth_saving(evaluated, seconds, self.ctx.seq_state_size(seq)):
            self.prompt_cache.save(cached, self.ctx.seq_state(seq))

    def generate(self, prompt: str | list[int], sampling: Sampling | None = None, *,
                 messages: list[dict[str, str]] | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` as printable text pieces; `self.stats` describes the run afterwards.
        `messages` (the conversation the prompt was made from) is for a remote backend; a local one needs only the
        prompt."""
        s = sampling or Sampling()
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(tokens)
        self.stats = stats = Stats(prompt_tokens=len(tokens))
        start = time.perf_counter()
        self.evaluate(tokens)
        stats.prompt_seconds = time.perf_counter() - start
        step = Step(self.vocab, s.stop, min(s.max_tokens, self.n_ctx - len(tokens)), s.max_tokens, answer=s.answer)
        chain = self._sampler(s, tokens)
        ctx = self.ctx.ptr
        take, sample, decode, get_one = step.take, chain.sample, lc.llama_decode, lc.llama_batch_get_one
        eos = StopReason.EOS
        one = (lc.llama_token * 1)()
        cache = self.cache
        spec = self.speculator
        if spec is not None:
            spec.counts = Counts()
        ahead: list[int] = []  # tokens the sampler already chose in a verification, not yet handed out
        self.generated = generated = []  # token ids of this answer, for callers that need them (tests, eval)
        first = 0.0
        stats.stop_reason = StopReason.INTERRUPTED  # until the loop ends on its own
        reason = step.reason
        try:
            while reason is None:
                token = ahead.pop(0) if ahead else sample(ctx, -1)
                if not first:
                    first = time.perf_counter()
                    stats.ttft = first - start
                piece = take(token)
                reason = step.reason
                if reason is eos:
                    break
                generated.append(token)
                if piece:
                    yield piece
                if reason is not None or ahead:
                    continue  # nothing will follow, or the next token is known and this one already in the cache
                if spec is not None:
                    cache.append(token)
                    try:
                        ahead = spec.advance(ctx, chain, 0, cache, step.draft_room)
                    except UserError:
                        cache.pop()  # advance dropped it from the KV cache
                        raise
                    cache.extend(ahead[:-1])  # the accepted draft is in the KV cache; the last sample is not yet
                    continue
                one[0] = token
                if decode(ctx, get_one(one, 1)) != 0:
                    raise UserError("llama.cpp failed while generating (llama_decode error)")
                cache.append(token)
            stats.stop_reason = reason
            tail = step.finish()  # nothing after a stop text
            if tail:
                yield tail
            self.save(cache, stats.prompt_tokens - stats.cached_tokens, stats.prompt_seconds)
        finally:
            stats.generated_tokens = step.n
            stats.decode_seconds = time.perf_counter() - first if first else 0.0
            if spec is not None:
                stats.draft_proposed, stats.draft_accepted = spec.counts.proposed, spec.counts.accepted
            chain.free()

    def complete(self, prompt: str | list[int], sampling: Sampling | None = None) -> tuple[str, Stats]:
        text = "".join(self.generate(prompt, sampling))
        return text, self.stats
