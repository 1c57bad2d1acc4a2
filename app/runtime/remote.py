"""A model on a server (malhae serve, llama.cpp's llama-server, vLLM, any OpenAI-compatible API) behind the same
interface as the local engine: tokenize, generate text pieces, stats afterwards.

The prompt is malhae's own: the front end applies its template and this sends the tokens through `/v1/completions`,
tokenized by the server itself (its /tokenize), so the server sees exactly the tokens the local engine would evaluate
and a greedy answer from the same GGUF is the local one token for token. With `chat=True` a conversation goes through
`/v1/chat/completions` instead and the server applies its own template.

Servers differ in the sampling fields they take; `request_fields` is the one table of who takes what, and a setting
that a server cannot take is named once (never dropped in silence). Stats are measured here, at the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from malhae.errors import UserError
from malhae.runtime import wire
from malhae.runtime.endpoint import Endpoint, HttpError
from malhae.runtime.engine import Stats, check_fits, check_prompt
from malhae.runtime.settings import Sampling
from malhae.runtime.step import StopReason
from malhae.runtime.stream import TextStream

Notify = Callable[[str], None]
Messages = list[dict[str, str]]

MALHAE, LLAMA_CPP, VLLM, OPENAI = "malhae", "llama.cpp", "vLLM", "OpenAI-compatible"
OWNERS = {"malhae": MALHAE, "llamacpp": LLAMA_CPP, "vllm": VLLM}  # /v1/models' owned_by → kind of server
ECHO_SERVERS = "malhae serve or vLLM"  # servers that return a prompt's log-probabilities (echo + logprobs)
DEFAULT_CTX = 2048  # the Polyglot-Ko family's trained context, when a server does not say its own
MAX_MODELS = 10_000
# events without text a stream may have beyond one per token (a first role-only delta, the finish and usage chunks)
EXTRA_EVENTS = 16
# what llama-server reports as its chat template when the GGUF has none (common/chat.cpp, CHATML_TEMPLATE_SRC): not
# the model's own, so malhae frames the prompt by the model's name, as it does locally for such a GGUF
LLAMA_CPP_FALLBACK = ("{%- for message in messages -%}\n"
                      "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
                      "{%- endfor -%}\n"
                      "{%- if add_generation_prompt -%}\n"
                      "  {{- '<|im_start|>assistant\n' -}}\n"
                      "{%- endif -%}")


class TextTokens(list):
    """Stand-ins for the tokens of a text, for a server that cannot tokenize (no /tokenize): as many as the text has
    bytes, an upper bound (every token is at least one byte), so the context is never overfilled; `text` is what
    is sent instead."""

    def __init__(self, text: str) -> None:
        super().__init__([0] * len(text.encode("utf-8")))
        self.text = text


@dataclass(frozen=True)
class Model:
    id: str
    kind: str
    n_ctx: int | None


def request_fields(kind: str, s: Sampling) -> tuple[dict, list[str]]:
    """The sampling fields of a request to a `kind` of server, and the settings it cannot take (with a value that
    would change the answer)."""
    fields: dict = {"temperature": s.temperature, "top_p": s.top_p}
    if s.seed is not None:
        fields["seed"] = s.seed
    if s.frequency_penalty:
        fields["frequency_penalty"] = s.frequency_penalty
    if s.presence_penalty:
        fields["presence_penalty"] = s.presence_penalty
    untaken: list[str] = []
    penalised = s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty
    if kind in (MALHAE, LLAMA_CPP):  # llama.cpp's samplers on both: the same names, the same meaning
        fields |= {"top_k": s.top_k, "min_p": s.min_p, "repeat_penalty": s.repeat_penalty,
                   "repeat_last_n": s.repeat_last_n}
        if s.ignore_eos and kind == LLAMA_CPP:
            fields["ignore_eos"] = True
        elif s.ignore_eos:
            untaken.append("ignore_eos")
    elif kind == VLLM:
        fields |= {"top_k": s.top_k or -1, "min_p": s.min_p, "repetition_penalty": s.repeat_penalty}
        if s.ignore_eos:
            fields["ignore_eos"] = True
        if penalised and s.repeat_last_n:  # vLLM's penalties look at the whole prompt and answer
            untaken.append(f"repeat_last_n {s.repeat_last_n}")
    else:  # the OpenAI API itself refuses fields it does not know
        untaken += [f"{name} {value:g}" for name, value, off in (("top_k", s.top_k, 0), ("min_p", s.min_p, 0),
                                                                 ("repeat_penalty", s.repeat_penalty, 1))
                    if value != off]
        if s.ignore_eos:
            untaken.append("ignore_eos")
    return fields, untaken


def constraint_fields(kind: str, s: Sampling, chat: bool) -> dict:
    """The fields that hold a server's answer to Sampling.grammar: OpenAI's response_format where a JSON schema goes
    through a chat (every kind) or vLLM's completions, llama.cpp's own `json_schema` / `grammar` on malhae's and
    llama-server's completions. A server that cannot take it is a UserError: an answer not held to the schema would
    look like one that is."""
    g = s.grammar
    if g is None:
        return {}
    if g.is_json and (chat or kind == VLLM):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": g.schema}}}
    if kind in (MALHAE, LLAMA_CPP):
        return {"json_schema": g.schema} if g.is_json else {"grammar": g.gbnf}
    if g.is_json:
        raise UserError(f"the {kind} server takes a JSON schema only in a chat request: add --remote-chat")
    raise UserError(f"the {kind} server does not take a GBNF grammar (malhae serve and llama-server do); give a JSON "
                    "schema with --schema instead")


class RemoteBackend:
    """One model on one server. Opening it asks the server what it serves (GET /v1/models), so a wrong URL, key or
    model name fails here, before anything is typed."""

    remote = True

    def __init__(self, endpoint: Endpoint, model: str | None = None, *, chat: bool = False,
                 n_ctx: int | None = None, notify: Notify | None = None) -> None:
        self.endpoint = endpoint
        self.chat_mode = chat
        self.notify = notify or (lambda message: None)
        self.ctx_asked = n_ctx
        self.stats = Stats()
        self.generated: list[int] = []  # token ids are not known at the client; kept for the interface
        self._named: set[str] = set()
        self._tokenizes: bool | None = None  # whether the server has /tokenize (None: not asked yet)
        self._extras: dict = {}
        self.use(model)

    # --- which model -----------------------------------------------------------------------------------------

    def models(self) -> list[Model]:
        data = self.endpoint.get("/models")
        cards = data.get("data")
        if not isinstance(cards, list) or len(cards) > MAX_MODELS:
            raise UserError(f"{self.endpoint.url}/models did not list models the OpenAI way (a \"data\" list); "
                            "check --endpoint")
        out = []
        for card in cards:
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                raise UserError(f"{self.endpoint.url}/models lists a model without an id; check --endpoint")
            meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
            sizes = (wire.context_size(f"{self.endpoint.url}/models", name, value) for name, value in (
                ("context_length", card.get("context_length")), ("max_model_len", card.get("max_model_len")),
                ("meta.n_ctx", meta.get("n_ctx"))))
            n_ctx = next((v for v in sizes if v), None)
            out.append(Model(card["id"], OWNERS.get(str(card.get("owned_by", "")).lower(), OPENAI), n_ctx))
        return out

    def use(self, name: str | None) -> None:
        """Talk to model `name` from now on (None: the server's only model)."""
        served = self.models()
        if not served:
            raise UserError(f"the server at {self.endpoint.url} serves no model yet (empty /v1/models); wait until "
                            "it has loaded one")
        ids = ", ".join(m.id for m in served[:20]) + (" …" if len(served) > 20 else "")
        if name is None:
            if len(served) > 1:
                raise UserError(f"the server at {self.endpoint.url} serves {len(served)} models ({ids}); choose one "
                                "with --model")
            chosen = served[0]
        else:
            chosen = next((m for m in served if m.id == name), None)
            if chosen is None:
                raise UserError(f"the server at {self.endpoint.url} has no model {name!r}; it serves: {ids}")
        self.model = chosen
        self.kind = chosen.kind
        self._extras = self._server_extras()
        told = chosen.n_ctx or self._extras.get("n_ctx")
        self.n_ctx = told or self.ctx_asked or DEFAULT_CTX
        if not told and not self.ctx_asked:
            self.notify(f"the server does not say its context size; assuming {DEFAULT_CTX} tokens (--ctx N sets it)")

    def _server_extras(self) -> dict:
        """What a server tells beyond /v1/models, for the prompt format: its chat template and special tokens."""
        if self.kind == LLAMA_CPP:
            props = self._optional("/props")
            settings = props.get("default_generation_settings")
            n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
            source = props.get("chat_template")
            if isinstance(source, str) and source.strip() == LLAMA_CPP_FALLBACK.strip():
                source = None
            return {"chat_template": source, "bos": props.get("bos_token"), "eos": props.get("eos_token"),
                    "n_ctx": wire.context_size(f"{self.endpoint.root}/props", "default_generation_settings.n_ctx",
                                               n_ctx)}
        if self.kind in (MALHAE, VLLM):
            info = self._optional("/tokenizer_info")
            return {"chat_template": info.get("chat_template"), "bos": info.get("bos_token"),
                    "eos": info.get("eos_token")}
        return {}

    def _optional(self, path: str) -> dict:
        try:
            return self.endpoint.get(path, root=True)
        except UserError:  # a server without it (vLLM without --enable-tokenizer-info-endpoint): no template then
            return {}

    @property
    def name(self) -> str:
        return self.model.id

    @property
    def where(self) -> str:
        return f"{self.kind} at {self.endpoint.url}"

    location = where

    def chat_template_info(self) -> tuple[str | None, str, str]:
        """(the server's chat template, its BOS text, its EOS text), for app.runtime.templates.for_engine."""
        source, bos, eos = (self._extras.get(k) for k in ("chat_template", "bos", "eos"))
        return (source if isinstance(source, str) else None, bos if isinstance(bos, str) else "",
                eos if isinstance(eos, str) else "")

    def close(self) -> None:
        pass  # one connection per request: nothing stays open

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tokens ----------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """The server's own tokens for `text` (so what is counted is what it evaluates); TextTokens when it has no
        /tokenize."""
        if self._tokenizes is False:
            return TextTokens(text)
        if self.kind == LLAMA_CPP:
            body = {"content": text, "add_special": add_special, "parse_special": parse_special}
        elif self.kind == MALHAE:
            body = {"prompt": text, "add_special_tokens": add_special, "parse_special": parse_special}
        else:
            body = {"model": self.model.id, "prompt": text, "add_special_tokens": add_special}
        try:
            tokens = self.endpoint.post("/tokenize", body, root=True).get("tokens")
        except HttpError as e:
            if self._tokenizes is None and self.kind == OPENAI and e.status == 404:
                self._tokenizes = False
                self.notify("the server has no /tokenize: malhae counts a prompt by its bytes, which is more than "
                            "its tokens, so long conversations forget old turns early")
                return TextTokens(text)
            raise
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise UserError(f"{self.endpoint.root}/tokenize did not answer with a list of token ids; check "
                            "--endpoint")
        self._tokenizes = True
        return tokens

    def check_prompt(self, tokens: list[int]) -> None:
        check_prompt(tokens, self.n_ctx, server=True)

    def check_fits(self, n_prompt: int) -> None:
        check_fits(n_prompt, self.n_ctx, server=True)

    # --- generation ------------------------------------------------------------------------------------------

    def _fields(self, s: Sampling) -> dict:
        fields, untaken = request_fields(self.kind, s)
        new = [u for u in untaken if u.split()[0] not in self._named]
        if new:
            self._named.update(u.split()[0] for u in new)
            self.notify(f"the {self.kind} server does not take {', '.join(new)}: not applied")
        return fields

    def generate(self, prompt: str | list[int], sampling: Sampling | None = None, *,
                 messages: Messages | None = None) -> Iterator[str]:
        """Stream the answer's text pieces. `messages` is the conversation the prompt was made from: with chat=True
        it is sent instead, and the server frames it with its own template."""
        s = sampling or Sampling()
        tokens = prompt if isinstance(prompt, list) else self.tokenize(prompt)
        self.check_prompt(tokens)
        max_new = min(s.max_tokens, self.n_ctx - len(tokens))
        body = {"model": self.model.id, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_new, **self._fields(s)}
        if s.stop:
            body["stop"] = list(s.stop)
        if self.kind == LLAMA_CPP:  # its last chunk then says how the answer ended (stop_type), which OpenAI's
            body["verbose"] = True  # finish_reason "stop" does not
        chat = self.chat_mode and messages is not None
        body |= constraint_fields(self.kind, s, chat)
        if chat:
            # the server's template makes the prompt; malhae's, whose tokens were counted, is its estimate
            path, body["messages"] = "/chat/completions", messages
        else:
            path = "/completions"
            body["prompt"] = tokens.text if isinstance(tokens, TextTokens) else list(tokens)
        return self._stream(path, body, s, len(tokens), max_new)

    def _stream(self, path: str, body: dict, s: Sampling, n_prompt: int, max_new: int) -> Iterator[str]:
        """The answer's pieces as the server streams them, never trusting it to stop: a server that goes on past
        max_new pieces (it ignores max_tokens, or the context is full) or past its own finish_reason is hung up on
        there, and the answer ends as the local engine's would (LENGTH or CONTEXT). A piece with text is at least one
        token, so a server that heeds max_tokens is never cut short."""
        self.stats = stats = Stats(prompt_tokens=n_prompt)
        stream = TextStream(s.stop, answer=s.answer)
        start = time.perf_counter()
        first = 0.0
        pieces = idle = 0  # events with text; events without (bounded too: a stream of empty events never ends)
        finish = None
        # the stop text found, or None for an end token: vLLM's and malhae's stop_reason, llama-server's stop_type
        matched: object = ...
        usage = None
        over = False  # the server went on where the answer had to end: reading stopped there
        stats.stop_reason = StopReason.INTERRUPTED
        where = self.endpoint.url + path
        events = self.endpoint.stream(path, body)
        try:
            for event in events:
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                matched = wire.verbose_stop(where, event.get("__verbose"), matched)
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise UserError(f"{where} streamed an event without choices; it does not answer like an "
                                    "OpenAI-compatible API")
                said = False
                for choice in choices:
                    text, ended, reason = wire.choice(where, choice)
                    if text:
                        if pieces >= max_new or finish is not None:
                            over = True
                            break
                        if not first:
                            first = time.perf_counter()
                            stats.ttft = stats.prompt_seconds = first - start  # as seen from here
                        pieces += 1
                        said = True
                        shown = stream.feed(text.encode("utf-8"))
                        if shown:
                            yield shown
                    if ended:
                        finish = ended
                        if reason is not ...:
                            matched = reason
                idle += not said
                over = over or idle > max_new + EXTRA_EVENTS
                if stream.stopped or over:
                    break
            if stream.stopped:
                stats.stop_reason = StopReason.STOP
            else:
                tail = stream.finish()
                if tail:
                    yield tail
                if over and finish is None:
                    stats.stop_reason = StopReason.LENGTH if max_new >= s.max_tokens else StopReason.CONTEXT
                    return
                if finish is None:
                    raise UserError(f"the answer from {self.endpoint.url} ended without a finish_reason; the "
                                    "server stopped it")
                # without stop_reason, an end token and a stop text both read "stop"
                found = isinstance(matched, str) or matched is ... and bool(s.stop)
                stats.stop_reason = StopReason.from_openai(finish, stop_text=found, max_tokens=max_new >= s.max_tokens)
        finally:
            events.close()
            stats.decode_seconds = time.perf_counter() - first if first else 0.0
            stats.generated_tokens = pieces
            if usage is not None:
                self._read_usage(stats, usage, max_new)

    def _read_usage(self, stats: Stats, usage: dict, max_new: int) -> None:
        """A server's own counts, where they are counts; never more than it may have sent or its context holds."""
        if wire.count(usage.get("completion_tokens")):
            stats.generated_tokens = usage["completion_tokens"]
            if self.kind == LLAMA_CPP and stats.stop_reason is StopReason.EOS and stats.generated_tokens:
                stats.generated_tokens -= 1  # llama-server counts the end token; malhae counts what was said
        stats.generated_tokens = min(stats.generated_tokens, max_new)
        if wire.count(usage.get("prompt_tokens")):
            stats.prompt_tokens = min(usage["prompt_tokens"], self.n_ctx)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and wire.count(details.get("cached_tokens")):
            stats.cached_tokens = min(details["cached_tokens"], stats.prompt_tokens)

    # --- log-likelihoods -------------------------------------------------------------------------------------

    def check_echo(self) -> None:
        """Refuse, before any work, a server known not to return a prompt's log-probabilities."""
        if self.kind == LLAMA_CPP:
            raise UserError(f"llama-server does not return a prompt's log-probabilities (echo), which scoring needs; "
                            f"serve the model with {ECHO_SERVERS} for eval --endpoint")

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[tuple[float, bool]]]:
        """For each prompt, every token after the first: (log p(token | the tokens before it), whether it is the
        likeliest one there), from `echo` + `logprobs` on /v1/completions, as lm-eval's local-completions asks."""
        self.check_echo()
        for p in prompts:
            self.check_prompt(p)
        body = {"model": self.model.id, "prompt": [list(p) for p in prompts], "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "echo": True}
        data = self.endpoint.post("/completions", body)
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise UserError(f"{self.endpoint.url}/completions answered {len(prompts)} prompts with "
                            f"{len(choices) if isinstance(choices, list) else 'no'} choices; it does not answer "
                            "like an OpenAI-compatible API")
        ordered = wire.in_order(f"{self.endpoint.url}/completions", choices, len(prompts))
        return [self._echoed(c, len(p)) for c, p in zip(ordered, prompts, strict=True)]

    def _echoed(self, choice: object, n: int) -> list[tuple[float, bool]]:
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(values, list) or len(values) < n or not isinstance(tops, list) or len(tops) < n:
            raise UserError(f"the {self.kind} server at {self.endpoint.url} did not return the prompt's "
                            f"log-probabilities (echo); scoring needs a server that does: {ECHO_SERVERS}")
        out = []
        server = f"the {self.kind} server at {self.endpoint.url}"
        for value, top in zip(values[1:n], tops[1:n], strict=True):
            if top is not None and not isinstance(top, dict):
                raise wire.malformed(f"{self.endpoint.url}/completions", "top_logprobs", top)
            value = wire.logprob(server, value)
            best = max((wire.logprob(server, v) for v in top.values()), default=value) if top else value
            out.append((value, value >= best - 1e-6))
        return out
