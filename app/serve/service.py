"""What every endpoint needs once the model is loaded: the engine, its scheduler, its chat format, and how its tokens
read as text. One object, made when loading ends, so that a handler never sees a half-loaded model."""

from __future__ import annotations

import codecs
import copy
import time
from dataclasses import dataclass, field
from functools import cached_property

from gguf import Keys

from malhae import nfc
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.batching import Scheduler
from malhae.runtime.engine import Engine
from malhae.runtime.settings import LoadOptions, Lora
from malhae.serve.errors import ApiError

MAX_PROMPTS = 64  # prompts × n in one request: each is a sequence in the queue


@dataclass
class Service:
    engine: Engine
    scheduler: Scheduler
    template: templates.Template
    model_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    composed: nfc.Once = field(default_factory=lambda: nfc.Once(None))  # the log's one line on NFC (app.nfc)
    # the adapters given at start (`--lora`; an id is a place in this tuple), and the scales requests without their
    # own `lora` run with (POST /lora-adapters sets them: app.serve.adapters)
    loras: tuple[Lora, ...] = ()
    lora_scales: list[float] = field(default_factory=list)
    # what the name a request asked for adds (app.serve.names.Target; set on a view, never on the loaded Service):
    # the model's system text and sampling defaults, under a request's own values
    system: str | None = None
    defaults: dict = field(default_factory=dict)
    waited: float = 0.0  # seconds this request waited for the model to load (Ollama's load_duration)

    def __post_init__(self) -> None:
        self.loras = tuple(self.engine.options.lora)
        self.lora_scales = [lora.scale for lora in self.loras]

    @classmethod
    def load(cls, options: LoadOptions, *, model_id: str, queue: int, template: str | None = None,
             notify=None, start=None) -> Service:
        """The model loaded with options.parallel slots; `queue` requests may wait for one. `start(fn)` runs fn (the
        scheduler's start) on another thread and returns its result: a server loads models in a thread of low
        priority (app.serve.residency), and a thread inherits its creator's, so the scheduler thread — and the
        decode threads it starts — must not be born there."""
        engine = Engine(options, notify=notify)
        try:
            chosen = templates.get(template) if template else templates.for_engine(engine)
            service = cls(engine, (start or _now)(lambda: Scheduler(engine, queue=queue)), chosen, model_id,
                          composed=nfc.Once(notify))
            service.longest_piece  # noqa: B018 (computed now, not during the first request)
            return service
        except BaseException:
            engine.close()
            raise

    def view(self, target) -> Service:
        """This loaded model as `target` (app.serve.names.Target) serves it: under the name asked for, with that
        name's adapters (an adapter preset), template, system text and sampling defaults. A shallow copy: the
        engine, scheduler and adapter scales are the loaded model's."""
        seen = copy.copy(self)
        seen.model_id = target.name
        if target.template:
            seen.template = templates.get(target.template)
        seen.system = target.system
        seen.defaults = dict(target.sampling)
        if target.adapters:
            seen.loras = target.adapters
            seen.lora_scales = [a.scale for a in target.adapters]
        return seen

    def close(self) -> None:
        self.scheduler.close()
        self.engine.close()

    # --- tokens ----------------------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.engine.n_vocab

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @cached_property
    def longest_piece(self) -> int:
        """The most bytes one token stands for: a text of B bytes is at least B / this many tokens."""
        return max(1, max(len(self.engine.model.token_bytes(t, special=False)) for t in range(self.n_vocab)))

    def tokenize(self, text: str, *, add_special: bool = True, bounded: bool = True, parse_special: bool = True
                 ) -> list[int]:
        """A request's text as tokens. `bounded`: a text that cannot fit the context is refused before tokenizing
        (8 MiB of Korean took 2.5 s, during which every stream of the server stood still)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # JSON may carry lone surrogates ("\ud800"), which are no text
            raise ApiError("the text holds a lone surrogate (an invalid \\uD800-\\uDFFF escape); send valid "
                           "Unicode", code="invalid_text") from None
        if bounded and len(data) // self.longest_piece >= self.n_ctx:
            raise ApiError(f"the prompt is at least {len(data) // self.longest_piece:,} tokens; this server's "
                           f"context is {self.n_ctx} per request", code="context_length_exceeded", param="prompt")
        return self.engine.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def compose(self, text: str) -> str:
        """A prompt or message in NFC (app.nfc), as the model was trained; the log says once, not per request."""
        return nfc.compose(text, "a request's text (every prompt and message is composed; said once)", self.composed)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    def piece(self, token: int) -> bytes:
        return self.engine.model.token_bytes(token, special=True)

    def token_text(self, token: int) -> str:
        """A token as logprobs name it: its text, or `bytes:\\xNN…` when it holds part of a character (as OpenAI
        writes such tokens)."""
        data = self.piece(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def special_text(self, key: str) -> str | None:
        token = self.engine.info.metadata.get(key)
        return self.piece(int(token)).decode("utf-8", "replace") if isinstance(token, int) else None

    @property
    def eos_text(self) -> str | None:
        return self.special_text(Keys.Tokenizer.EOS_ID)

    @property
    def chat_template(self) -> str:
        own = self.engine.info.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
        return own if isinstance(own, str) and own.strip() else self.template.chat_template

    def chat_prompt(self, turns: list[tuple[str, str]], system: str | None = None) -> str:
        """The turns in the model's chat format. A template that fails while rendering (its raise_exception, a bug
        in its Jinja) is the served model's, which the client cannot change: 500 with the template's one line."""
        try:
            return self.template.prompt(turns, system=system)
        except UserError as e:
            raise ApiError(str(e), 500, code="template_error", kind="server_error") from None

    def check_ids(self, tokens: list[int], where: str) -> list[int]:
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.n_vocab:
                raise ApiError(f"{where}: token id {t!r} is not in the vocabulary (0 … {self.n_vocab - 1})",
                               param=where, code="invalid_token")
        return tokens

    def fit(self, tokens: list[int], max_new: int | None) -> int:
        """How many tokens this prompt may generate (ApiError when the prompt or max_tokens does not fit)."""
        from malhae.runtime.batching import check_request

        if max_new is None:
            max_new = self.defaults.get("max_tokens")  # the model's own (`malhae models set NAME max_tokens=…`)
        try:
            return check_request(self.engine, tokens, max_new)
        except UserError as e:
            where = "prompt" if max_new is None or len(tokens) >= self.n_ctx else "max_tokens"
            raise ApiError(str(e), code="context_length_exceeded", param=where) from None


def _now(fn):
    return fn()


def offsets(pieces: list[bytes], start: int = 0) -> list[int]:
    """Where each token's text begins in the decoded text (characters; a token that starts inside a character
    begins where that character does)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, at = [], start
    for data in pieces:
        out.append(at)
        at += len(decoder.decode(data))
    return out
