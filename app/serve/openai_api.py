"""OpenAI's `/v1/completions` and `/v1/chat/completions` on the scheduler, streamed (SSE) or whole.

Completions take the prompt as a string, a list of strings, a list of token ids or a list of such lists, and with
`echo` + `logprobs` give one log-probability per prompt token (the first null) in the legacy shape — what
lm-evaluation-harness's `local-completions` reads to score a continuation (it sends `max_tokens: 1`, reads
`token_logprobs[ctxlen:-1]` and compares each with the best of its `top_logprobs`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

from malhae.runtime.batching import MAX_TOP_LOGPROBS
from malhae.runtime.events import Done, Prompt, Token, TokenLogprob
from malhae.serve import adapters, fields, structured
from malhae.serve.errors import ApiError, shutting_down
from malhae.serve.fields import Body
from malhae.serve.jobs import Request
from malhae.serve.messages import render_chat
from malhae.serve.service import MAX_PROMPTS, Service, offsets
from malhae.serve.sse import JobStream
from malhae.serve.tools import Reply, Tools

MAX_N = 16
# ignore_eos, min_tokens: vLLM's and llama-server's benchmarks send them; lora: llama-server's (app.serve.adapters);
# keep_alive: Ollama's, on every endpoint (read by app.serve.routes before the handler runs)
COMMON = ("model", "keep_alive", "stream", "stream_options", "max_tokens", "n", "stop", "seed", "user", "logit_bias",
          "ignore_eos", "min_tokens", "lora", *fields.SAMPLING_FIELDS)
COMPLETION_FIELDS = (*COMMON, "prompt", "echo", "logprobs", "suffix", "best_of", *structured.FIELDS)
CHAT_FIELDS = (*COMMON, *structured.FIELDS, "messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools",
               "tool_choice", "functions", "function_call", "parallel_tool_calls", "modalities", "audio",
               "web_search_options")
# fields accepted and ignored because ignoring them changes no answer: bookkeeping (metadata, store, user ids, cache
# keys), scheduling hints, reasoning knobs of models that have none, llama-server's cache_prompt (always on here)
HARMLESS = ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "reasoning_effort",
            "verbosity", "prediction", "cache_prompt")


def _sampling(body: Body, stop: tuple[str, ...], svc: Service):
    """The request's sampling; `ignore_eos: true` (vLLM's, llama-server's) lets the answer run past the end token to
    max_tokens, as benchmark clients want every answer the same length."""
    values = {k: body.get(k, (int, float)) for k in fields.SAMPLING_FIELDS}
    sampling = fields.sampling(values, stop, defaults=svc.defaults)
    sampling.ignore_eos = body.flag("ignore_eos")
    return sampling


def _min_tokens(body: Body, max_tokens: int | None, svc: Service) -> int:
    """vLLM's `min_tokens`: neither the end token nor a stop text ends the answer before this many tokens; at most
    max_tokens (without one, the context)."""
    return body.integer("min_tokens", 0, 0, svc.n_ctx if max_tokens is None else max_tokens)  # type: ignore[return-value]


def _seeded(sampling, i: int):
    """Choice i of n: the same settings, the next seed (n equal answers would be useless)."""
    from dataclasses import replace

    return sampling if sampling.seed is None or i == 0 else replace(sampling, seed=(sampling.seed + i) % 2**32)


def _include_usage(body: Body) -> bool:
    options = body.get("stream_options", (dict,), {})
    extra = set(options) - {"include_usage", "continuous_usage_stats"}
    if extra:
        raise ApiError(f"stream_options: unknown field {sorted(extra)[0]!r}", param="stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError("stream_options.include_usage must be true or false", param="stream_options")
    return usage


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class _Choice:
    """What one job has produced so far."""

    text: str = ""
    finish: str | None = None
    error: str = ""
    done: Done | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt: list[TokenLogprob] = field(default_factory=list)


def _collect(choice: _Choice, event) -> None:
    if isinstance(event, Token):
        choice.text += event.text
        if event.logprob is not None:
            choice.logprobs.append(event.logprob)
    elif isinstance(event, Prompt):
        choice.prompt = list(event.tokens)
    elif isinstance(event, Done):
        choice.done = event
        choice.finish = event.reason.openai
        choice.error = event.error


def _ended(choice: _Choice) -> dict:
    """finish_reason, and vLLM's stop_reason beside it: the stop text that ended the answer, None for an end token
    (OpenAI's "stop" means either; a client such as malhae's remote backend wants to know which)."""
    return {"finish_reason": choice.finish, "stop_reason": choice.done.stop_text if choice.done else None}


async def _whole(req: Request, request) -> list[_Choice]:
    """Every job's whole answer, for a request that is not streamed; a failed job fails the request (500)."""
    try:
        choices = [_Choice() for _ in req.jobs]
        async for index, event in req.events(request.is_disconnected):
            _collect(choices[index], event)
    finally:
        req.cancel()
    if req.stopped:
        raise shutting_down()
    failed = next((c for c in choices if c.error), None)
    if failed:
        raise ApiError(failed.error, 500, code="generation_failed", kind="server_error")
    return choices


def _sse(data: object) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _Chunks:
    """One stream's chunks, the constant head (id, object, created, model) serialised once: a chunk per token is the
    server's hot path."""

    def __init__(self, head: dict) -> None:
        self.prefix = ("data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": [').encode()

    def __call__(self, choice: dict) -> bytes:
        return self.prefix + json.dumps(choice, ensure_ascii=False).encode() + b"]}\n\n"


DONE = b"data: [DONE]\n\n"


# --- /v1/completions -------------------------------------------------------------------------------------------

def _prompts(svc: Service, value: object, as_given: bool = False) -> list[tuple[list[int], str | None]]:
    """The prompts of a completions request as (token ids, text or None for ids). A text is composed to NFC
    (app.nfc) unless `as_given`: with echo, a scoring client (lm-evaluation-harness) counts the prompt's tokens with
    its own tokenizer on the text it sent, so those must stay its tokens. Ids are never changed."""
    def text(prompt: str) -> tuple[list[int], str]:
        prompt = prompt if as_given else svc.compose(prompt)
        return svc.tokenize(prompt), prompt

    if isinstance(value, str):
        return [text(value)]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [text(p) for p in value[:MAX_PROMPTS + 1]]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [(svc.check_ids(value, "prompt"), None)]
        if all(isinstance(p, list) for p in value):
            return [(svc.check_ids(p, f"prompt[{i}]"), None) for i, p in enumerate(value[:MAX_PROMPTS + 1])]
    raise ApiError("prompt must be a string, an array of strings, an array of token ids or an array of arrays of "
                   "token ids (none empty)", param="prompt", code="invalid_prompt")


def _legacy(svc: Service, choice: _Choice, prompt: list[int], echo: bool, echo_text: str) -> dict:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs (a dict per token) and text_offset."""
    entries = (choice.prompt if echo else []) + choice.logprobs
    pieces = [svc.piece(e.token) for e in entries]
    start_gen = len(choice.prompt) if echo else 0
    offs = offsets(pieces[:start_gen]) + offsets(pieces[start_gen:], len(echo_text) if echo else 0)
    tops = [None if e.logprob is None else {svc.token_text(t): lp for t, lp in e.top} for e in entries]
    return {"tokens": [svc.token_text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offs}


async def completions(request, svc: Service):
    body = Body(await fields.read_json(request), COMPLETION_FIELDS, HARMLESS)
    if "prompt" not in body.data:
        raise ApiError("prompt is required", param="prompt", code="missing_field")
    body.forbid("suffix", ("",), "no fill-in-the-middle")
    body.forbid("best_of", (1,), "use n")
    body.forbid("logit_bias", ({},), "no logit bias")
    n = body.integer("n", 1, 1, MAX_N)
    max_tokens = body.integer("max_tokens", 16, 0)
    n_logprobs = body.integer("logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = body.flag("echo")
    stream = body.flag("stream")
    include_usage = _include_usage(body)
    sampling = _sampling(body, fields.stops(body.data.get("stop")), svc)
    sampling.grammar = await structured.checked(svc, structured.openai(body), "grammar")
    min_new = _min_tokens(body, max_tokens, svc)
    loras = adapters.for_request(svc, body)
    # llama_tokenize frees the GIL: streams go on
    prompts = await asyncio.to_thread(_prompts, svc, body.data["prompt"], echo)
    if len(prompts) * n > MAX_PROMPTS:
        raise ApiError(f"{len(prompts)} prompts × n {n} is more than {MAX_PROMPTS} sequences in one request",
                       param="prompt", code="too_many_prompts")
    req = Request(svc.scheduler)
    echo_texts = []
    for tokens, text in prompts:
        budget = svc.fit(tokens, max_tokens)
        echo_texts.append(text if text is not None else svc.detokenize(tokens))
        for i in range(n):
            req.add(tokens, _seeded(sampling, i), budget, logprobs=n_logprobs, echo=echo and n_logprobs is not None,
                    min_new=min_new, adapters=loras)
    ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": ident, "object": "text_completion", "created": created, "model": svc.model_id}
    req.submit()
    if stream:
        return JobStream(req, _completion_events(svc, req, head, n, prompts, echo, echo_texts, n_logprobs,
                                                 include_usage))
    choices = await _whole(req, request)
    out = []
    for index, choice in enumerate(choices):
        p = index // n
        text = (echo_texts[p] if echo else "") + choice.text
        logprobs = _legacy(svc, choice, prompts[p][0], echo, echo_texts[p]) if n_logprobs is not None else None
        out.append({"index": index, "text": text, "logprobs": logprobs, **_ended(choice)})
    return head | {"choices": out, "usage": _total_usage(choices, n)}


def _total_usage(choices: list[_Choice], n: int) -> dict:
    """Prompt tokens count once per prompt (not once per choice), as OpenAI counts them."""
    dones = [c.done for c in choices if c.done]
    prompt = sum(d.prompt_tokens for i, d in enumerate(dones) if i % n == 0)
    cached = sum(d.cached_tokens for i, d in enumerate(dones) if i % n == 0)
    return _usage(prompt, sum(d.completion_tokens for d in dones), cached)


async def _completion_events(svc, req, head, n, prompts, echo, echo_texts, n_logprobs, include_usage):
    choices = [_Choice() for _ in req.jobs]
    chunk = _Chunks(head)
    for index in range(len(req.jobs)) if echo and n_logprobs is None else ():  # else with its logprobs, below
        yield _sse(head | {"choices": [{"index": index, "text": echo_texts[index // n], "logprobs": None,
                                        "finish_reason": None}]})
    async for index, event in req.events():
        choice = choices[index]
        _collect(choice, event)
        if isinstance(event, Prompt):  # the echoed prompt, with one log-probability per token
            text = echo_texts[index // n]
            yield _sse(head | {"choices": [{"index": index, "text": text, "finish_reason": None,
                                            "logprobs": _legacy(svc, _Choice(prompt=list(event.tokens)), [], True,
                                                                text)}]})
        elif isinstance(event, Token) and (event.text or event.logprob is not None):
            logprobs = None
            if event.logprob is not None:
                e = event.logprob
                logprobs = {"tokens": [svc.token_text(e.token)], "token_logprobs": [e.logprob],
                            "top_logprobs": [{svc.token_text(t): v for t, v in e.top}], "text_offset": [0]}
            yield chunk({"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": None})
        elif isinstance(event, Done):
            if choice.error:
                yield _sse(ApiError(choice.error, 500, kind="server_error").body())
                continue
            yield _sse(head | {"choices": [{"index": index, "text": "", "logprobs": None, **_ended(choice)}]})
    if req.stopped:
        yield _sse(shutting_down().body())
    elif include_usage:
        yield _sse(head | {"choices": [], "usage": _total_usage(choices, n)})
    yield DONE


# --- /v1/chat/completions --------------------------------------------------------------------------------------

def _chat_logprobs(svc: Service, entries: list[TokenLogprob]) -> dict:
    def item(token: int, logprob: float) -> dict:
        return {"token": svc.token_text(token), "logprob": logprob, "bytes": list(svc.piece(token))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries]}


async def chat(request, svc: Service):
    body = Body(await fields.read_json(request), CHAT_FIELDS, HARMLESS)
    body.forbid("functions", ([],), "send them as tools")
    body.forbid("function_call", ("none", "auto"), "send tool_choice")
    body.forbid("logit_bias", ({},), "no logit bias")
    body.forbid("modalities", (["text"],), "this model writes text only")
    body.forbid("audio", (), "this model writes text only")
    body.forbid("web_search_options", (), "no web search: malhae is offline")
    n = body.integer("n", 1, 1, MAX_N)
    max_tokens = body.integer("max_completion_tokens", None, 0)
    if max_tokens is None:
        max_tokens = body.integer("max_tokens", None, 0)
    want_logprobs = body.flag("logprobs")
    top = body.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    n_logprobs = (top or 0) if want_logprobs else None
    stream = body.flag("stream")
    include_usage = _include_usage(body)
    tools = Tools.read(body.data.get("tools"), body.data.get("tool_choice"), body.data.get("parallel_tool_calls"))
    constraint = structured.openai(body)
    if tools is not None and constraint is not None:
        raise ApiError("tools and a response format both shape the answer; send one", param="tools",
                       code="invalid_value")
    grammar = await structured.checked(svc, tools.grammar() if tools else constraint, "tools" if tools else "grammar")
    sampling = _sampling(body, svc.template.stops(fields.stops(body.data.get("stop")), grammar), svc)
    sampling.grammar = grammar
    sampling.answer = True  # message.content starts at the answer's first character, not the format's space
    min_new = _min_tokens(body, max_tokens, svc)
    loras = adapters.for_request(svc, body)
    tokens = await asyncio.to_thread(svc.tokenize, render_chat(svc, body.data.get("messages"), tools))
    budget = svc.fit(tokens, max_tokens)
    req = Request(svc.scheduler)
    for i in range(n):
        req.add(tokens, _seeded(sampling, i), budget, logprobs=n_logprobs, min_new=min_new, adapters=loras)
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": ident, "created": created, "model": svc.model_id}
    req.submit()
    if stream:
        return JobStream(req, _chat_events(svc, req, head | {"object": "chat.completion.chunk"}, include_usage,
                                           tools))
    choices = await _whole(req, request)
    out = []
    for i, c in enumerate(choices):
        message, finish = _message(c, tools)
        out.append({"index": i, "message": message, "logprobs": _chat_logprobs(svc, c.logprobs) if n_logprobs is not
                    None else None, **_ended(c), "finish_reason": finish})
    return head | {"object": "chat.completion", "choices": out, "usage": _total_usage(choices, n)}


def _message(choice: _Choice, tools: Tools | None) -> tuple[dict, str | None]:
    """A choice's message and finish_reason: with tools, an answer is read back as a reply or as tool calls
    (finish_reason "tool_calls"); one cut off by max_tokens is what there was of the reply, or the call's text."""
    if tools is None:
        return {"role": "assistant", "content": choice.text}, choice.finish
    content, calls = tools.parse(choice.text)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
    return message, "tool_calls" if calls else choice.finish


async def _chat_events(svc, req, head, include_usage, tools: Tools | None = None):
    """The stream. With tools, a reply is streamed as its characters come (app.serve.tools.Reply), and a call is
    held until it is complete (it is JSON to be read back) and sent as one delta of tool_calls."""
    choices = [_Choice() for _ in req.jobs]
    replies = [Reply() for _ in req.jobs] if tools is not None else []
    chunk = _Chunks(head)
    for index in range(len(req.jobs)):
        yield _sse(head | {"choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    pending: dict[int, list[TokenLogprob]] = {}
    async for index, event in req.events():
        choice = choices[index]
        _collect(choice, event)
        if isinstance(event, Token):
            if event.logprob is not None:
                pending.setdefault(index, []).append(event.logprob)
            text = event.text if tools is None else replies[index].feed(event.text)
            if text:
                held = pending.pop(index, None) if tools is None else None
                yield chunk({"index": index, "delta": {"content": text},
                             "logprobs": _chat_logprobs(svc, held) if held else None, "finish_reason": None})
        elif isinstance(event, Done):
            if choice.error:
                yield _sse(ApiError(choice.error, 500, kind="server_error").body())
                continue
            held = pending.pop(index, None)
            finish = choice.finish
            if tools is not None:
                message, finish = _message(choice, tools)
                sent, content = replies[index].text, message["content"] or ""
                rest = content[len(sent):] if content.startswith(sent) else ""
                delta = {"tool_calls": [c | {"index": k} for k, c in enumerate(message["tool_calls"])]} \
                    if "tool_calls" in message else {"content": rest} if rest else None
                if delta:
                    yield chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
            yield _sse(head | {"choices": [{"index": index, "delta": {},
                                            "logprobs": _chat_logprobs(svc, held) if held else None,
                                            **_ended(choice), "finish_reason": finish}]})
    if req.stopped:
        yield _sse(shutting_down().body())
    elif include_usage:
        yield _sse(head | {"choices": [], "usage": _total_usage(choices, len(choices))})
    yield DONE
