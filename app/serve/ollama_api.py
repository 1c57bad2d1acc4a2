"""Ollama's own API, enough for Ollama clients (`ollama run`, its Python client, Open WebUI): /api/tags, /api/show,
/api/ps, /api/chat, /api/generate (NDJSON streaming), /api/version, and the plain "is it running" answer at /.

Ollama frames `/api/generate` prompts with the model's template unless `raw` is true, streams by default, reads
sampling from `options` (num_predict for max tokens, the rest by llama.cpp's names), ignores options it does not
know, and answers errors as `{"error": "…"}`; so does this.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

from malhae import __version__
from malhae.runtime.events import Done, Token
from malhae.serve import adapters, fields, structured
from malhae.serve.errors import ApiError, shutting_down
from malhae.serve.fields import Body
from malhae.serve.jobs import Request
from malhae.serve.messages import render_chat
from malhae.serve.service import Service
from malhae.serve.sse import JobStream
from malhae.serve.tools import Reply, Tools

GENERATE_FIELDS = ("model", "prompt", "system", "stream", "options", "raw", "keep_alive", "format", "images",
                   "template", "context", "suffix", "think")
CHAT_FIELDS = ("model", "messages", "stream", "options", "keep_alive", "format", "tools", "think")
OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty", "seed": "seed"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def version() -> dict:
    return {"version": __version__}


def runs_nothing(path: str, data: dict) -> bool:
    """Ollama's requests that only load a model (or, with keep_alive 0, unload it): an empty prompt, or no
    messages (`ollama run` preloads so; `ollama stop` sends keep_alive 0)."""
    if path == "/api/generate":
        return not data.get("prompt")
    return path == "/api/chat" and not data.get("messages")


def idle_answer(path: str, name: str, reason: str) -> dict:
    """Ollama's answer to such a request: done, with done_reason "load" or "unload"."""
    content = {"response": ""} if path == "/api/generate" else {"message": {"role": "assistant", "content": ""}}
    return {"model": name, "created_at": _now(), **content, "done": True, "done_reason": reason}


def _options(body: Body, svc: Service):
    options = body.get("options", (dict,), {})
    values = {key: options.get(name) for name, key in OPTION_NAMES.items()}
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ApiError(f"options.{name} must be a number", param="options")
    stop = fields.stops(options.get("stop"), "options.stop")
    num_predict = options.get("num_predict")
    if num_predict is not None and (isinstance(num_predict, bool) or not isinstance(num_predict, int)):
        raise ApiError("options.num_predict must be a whole number", param="options")
    max_new = None if num_predict is None or num_predict < 0 else num_predict  # -1: until the context ends
    return values, stop, max_new


def _check_format(body: Body) -> None:
    body.forbid("images", ([],), "this model reads text")
    body.forbid("suffix", ("",), "no fill-in-the-middle")
    body.forbid("template", ("",), "the model's own template is used")
    body.forbid("context", ([],), "send the conversation to /api/chat instead")


def _check_message_images(body: Body) -> None:
    """Ollama's chat messages carry `images` of their own: refused as the top-level field is, since dropping them
    would answer a question about a picture the model never saw."""
    messages = body.data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            Body(message, message).forbid("images", ([],), "this model reads text")  # every key known: only this


async def generate(request, svc: Service):
    body = Body(await fields.read_json(request), GENERATE_FIELDS)
    _check_format(body)
    prompt = body.get("prompt", (str,), "")
    system = body.get("system", (str,), None) or svc.system  # the request's, else the model's own
    raw = body.flag("raw")
    values, stop, max_new = _options(body, svc)
    stream = body.flag("stream", True)
    text = svc.compose(prompt if raw else svc.chat_prompt([("user", prompt)], system=system))  # app.nfc
    grammar = await structured.checked(svc, structured.ollama(body), "format")
    stop = stop if raw else svc.template.stops(stop, grammar)
    sampling = fields.sampling(values, stop, {k: f"options.{k}" for k in values}, svc.defaults)
    sampling.grammar = grammar
    sampling.answer = not raw  # framed: an answer, from its first character; raw: the text continues the prompt
    return await _run(request, svc, body, text, sampling, max_new, stream, lambda piece: {"response": piece})


async def chat(request, svc: Service):
    body = Body(await fields.read_json(request), CHAT_FIELDS)
    _check_format(body)
    _check_message_images(body)
    values, stop, max_new = _options(body, svc)
    stream = body.flag("stream", True)
    tools = Tools.read(body.data.get("tools"))
    constraint = structured.ollama(body)
    if tools is not None and constraint is not None:
        raise ApiError("tools and format both shape the answer; send one", param="tools")
    grammar = await structured.checked(svc, tools.grammar() if tools else constraint, "tools" if tools else "format")
    text = render_chat(svc, body.data.get("messages"), tools)
    sampling = fields.sampling(values, svc.template.stops(stop, grammar), {k: f"options.{k}" for k in values},
                              svc.defaults)
    sampling.grammar = grammar
    sampling.answer = True  # message.content starts at the answer's first character, not the format's space
    return await _run(request, svc, body, text, sampling, max_new, stream,
                      lambda piece: {"message": {"role": "assistant", "content": piece}}, tools)


def _tool_answer(answer: str, done: Done, tools: Tools) -> dict:
    """An answer of a request with tools, read back as Ollama's message: a reply (what there was of it, when cut
    off), or tool_calls."""
    content, calls = tools.parse(answer)
    message = {"role": "assistant", "content": content or ""}
    if calls:
        message["tool_calls"] = [c.ollama() for c in calls]
    return {"message": message}


def _finish_line(svc: Service, content: dict, done: Done | None, reason: str | None = None) -> dict:
    line = {"model": svc.model_id, "created_at": _now(), **content, "done": True,
            "done_reason": reason or (done.reason.ollama if done else "stop")}
    if done is not None:
        ns = 1_000_000_000
        line |= {"total_duration": int((done.seconds + svc.waited) * ns), "load_duration": int(svc.waited * ns),
                 "prompt_eval_count": done.prompt_tokens - done.cached_tokens,
                 "prompt_eval_duration": int(done.ttft * ns), "eval_count": done.completion_tokens,
                 "eval_duration": int(max(0.0, done.seconds - done.ttft) * ns)}
    return line


async def _run(request, svc: Service, body: Body, text: str, sampling, max_new, stream: bool, shape,
               tools: Tools | None = None):
    tokens = await asyncio.to_thread(svc.tokenize, text)
    budget = svc.fit(tokens, max_new)
    req = Request(svc.scheduler)
    req.add(tokens, sampling, budget, adapters=adapters.for_request(svc, body))  # the server's set: no `lora` here
    req.submit()
    if stream:
        return JobStream(req, _lines(svc, req, shape, tools), media_type="application/x-ndjson")
    try:
        answer, done = "", None
        async for _, event in req.events(request.is_disconnected):
            if isinstance(event, Token):
                answer += event.text
            elif isinstance(event, Done):
                done = event
    finally:
        req.cancel()
    if done is None:  # only a server that is stopping ends a request before its last event
        raise shutting_down()
    if done.error:
        raise ApiError(done.error, 500, kind="server_error")
    return _finish_line(svc, _tool_answer(answer, done, tools) if tools else shape(answer), done)


async def _lines(svc: Service, req: Request, shape, tools: Tools | None = None):
    """NDJSON lines. With tools, a reply is streamed as its characters come (app.serve.tools.Reply), and a call is
    held until it is complete (it is JSON to read back) and sent as one message."""
    answer, reply = "", Reply()
    async for _, event in req.events():
        if isinstance(event, Token) and tools is not None:
            answer += event.text
            text = reply.feed(event.text)
            if text:
                line = {"model": svc.model_id, "created_at": _now(), **shape(text), "done": False}
                yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
        elif isinstance(event, Token) and event.text:
            line = {"model": svc.model_id, "created_at": _now(), **shape(event.text), "done": False}
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
        elif isinstance(event, Done):
            if event.error:
                yield (json.dumps({"error": event.error}) + "\n").encode()
            else:
                told = _tool_answer(answer, event, tools) if tools is not None else None
                if told is not None:  # the calls, or the rest of a reply (nothing, once streamed whole)
                    message = told["message"]
                    sent = reply.text if message["content"].startswith(reply.text) else ""
                    message["content"] = message["content"][len(sent):]
                    if message["content"] or "tool_calls" in message:
                        line = {"model": svc.model_id, "created_at": _now(), **told, "done": False}
                        yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
                yield (json.dumps(_finish_line(svc, shape(""), event), ensure_ascii=False) + "\n").encode()
    if req.stopped:
        yield (json.dumps({"error": shutting_down().message}) + "\n").encode()

