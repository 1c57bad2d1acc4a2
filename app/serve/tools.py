"""Tool calls for a model that has no tool format of its own, as llama-server's generic handler does them.

The Polyglot-Ko family was never trained on tool calls, so the tools are described in the system text and the
answer is held by a grammar to one JSON object: `{"tool_call": {"name": …, "arguments": {…}}}` (or `tool_calls`, a
list, when parallel calls are allowed) or `{"response": "…"}`, a plain reply. The name can only be one of the tools
and the arguments only what its schema allows; whether the model calls the right tool with sensible values is up to
the model. The answer is then read back into OpenAI's `message.tool_calls` or Ollama's.

A conversation carrying calls and their results (assistant `tool_calls`, `role: "tool"` messages) is rendered back
into the prompt in the same JSON, so the model reads its own calls as it wrote them.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from malhae import files
from malhae.errors import UserError
from malhae.runtime import grammar as grammars
from malhae.runtime.grammar import Grammar
from malhae.serve.errors import ApiError

MAX_TOOLS = 64
MAX_PARALLEL = 8  # calls in one answer, when parallel_tool_calls
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function name


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict
    id: str

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return out if index is None else {"index": index} | out

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Tools:
    """The tools of one request, and which of them the answer may call (`choice`: auto, required or a name)."""

    functions: tuple[dict, ...]
    choice: str
    parallel: bool

    @classmethod
    def read(cls, tools: object, choice: object = None, parallel: object = None) -> Tools | None:
        """From a request's `tools`, `tool_choice` and `parallel_tool_calls` (OpenAI's shapes; Ollama sends the same
        tools); None when there are none or tool_choice is "none". Every mistake is a 400 naming the field."""
        if tools is None or tools == []:
            if choice not in (None, "none", "auto"):
                raise ApiError("tool_choice needs tools", param="tool_choice", code="invalid_value")
            return None
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ApiError(f"tools must be an array of at most {MAX_TOOLS} tools", param="tools", code="invalid_type")
        functions = tuple(_function(t, i) for i, t in enumerate(tools))
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise ApiError("two tools have the same name", param="tools", code="invalid_value")
        if parallel is not None and not isinstance(parallel, bool):
            raise ApiError("parallel_tool_calls must be true or false", param="parallel_tool_calls",
                           code="invalid_type")
        picked = _choice(choice, names)
        return None if picked == "none" else cls(functions, picked, bool(parallel))

    @property
    def allowed(self) -> list[dict]:
        """The tools the answer may call: all of them, or the one tool_choice names."""
        return [f for f in self.functions if self.choice in ("auto", "required") or f["name"] == self.choice]

    def instructions(self) -> str:
        """What the system text gains: the tools, and the answer's form (in Korean and English)."""
        lines = ["사용할 수 있는 도구 (tools you can call):"]
        for f in self.allowed:
            schema = json.dumps(f["parameters"], ensure_ascii=False)
            lines.append(f"- {f['name']}: {f['description'] or '(설명 없음)'} 인자(arguments): {schema}")
        call = '{"tool_calls": [{"name": "도구 이름", "arguments": {…}}]}' if self.parallel else \
            '{"tool_call": {"name": "도구 이름", "arguments": {…}}}'
        if self.choice == "auto":
            lines.append(f'JSON으로만 답하세요: 도구를 부르려면 {call}, 바로 답하려면 {{"response": "답"}}. '
                         f'Answer in JSON only: {call} to call a tool, or {{"response": "..."}} to reply.')
        else:
            lines.append(f"JSON으로만 답하세요: {call}. Answer in JSON only: {call}.")
        return "\n".join(lines)

    def grammar(self) -> Grammar:
        """The answer's grammar: a call of an allowed tool with arguments its schema allows, or (auto) a reply."""
        one = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                          "required": ["name", "arguments"]} for f in self.allowed]}
        calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1,
                                                                 "maxItems": MAX_PARALLEL}},
                 "required": ["tool_calls"]} if self.parallel else \
            {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}
        reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        schema = {"anyOf": [calls, reply]} if self.choice == "auto" else calls
        try:
            return grammars.from_schema(schema, "tools")
        except UserError as e:
            raise ApiError(str(e), param="tools", code="invalid_schema") from None

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        """(the reply's text, the calls) of an answer. One cut off by max_tokens is not JSON: a reply gives what
        there was of it, a call is given back as the text it was."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # a free-form argument ({"type": "object"}) may nest without end
            reply = Reply()
            reply.feed(text)
            return (reply.text if reply.started else text), []
        if not isinstance(value, dict):
            return text, []
        if "response" in value:
            return str(value["response"]), []
        items = value.get("tool_calls") or ([value["tool_call"]] if "tool_call" in value else [])
        return None, [Call(c["name"], c["arguments"], "call_" + secrets.token_hex(12)) for c in items]


ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class Reply:
    """The reply of an answer held to the tools' grammar, as it is generated: once the answer has begun as
    `{"response": "`, `feed` gives the string's characters as they come (escapes decoded, a \\uXXXX pair
    whole), so a streaming client sees a plain reply word by word, as without tools; an answer that begins as a
    call gives nothing (it is sent whole, once complete)."""

    START = re.compile(r'\{\s*"response"\s*:\s*"')

    def __init__(self) -> None:
        self.raw = ""
        self.pos = -1  # where the string's undecoded rest begins in raw; -1 until the reply is known to begin
        self.text = ""  # the reply so far
        self.ended = False

    @property
    def started(self) -> bool:
        return self.pos >= 0

    def feed(self, piece: str) -> str:
        """Add generated text; return the reply's characters it completed (often "")."""
        self.raw += piece
        if self.pos < 0:
            found = self.START.match(self.raw)
            if not found:
                return ""
            self.pos = found.end()
        out = []
        raw, i = self.raw, self.pos
        while i < len(raw) and not self.ended:
            c = raw[i]
            if c == '"':
                self.ended = True
                i += 1
            elif c != "\\":
                out.append(c)
                i += 1
            elif i + 1 >= len(raw):
                break  # the escape's next character has not come yet
            elif raw[i + 1] != "u":
                out.append(ESCAPES.get(raw[i + 1], raw[i + 1]))
                i += 2
            else:
                decoded, used = _unicode_escape(raw, i)
                if not used:
                    break
                out.append(decoded)
                i += used
        self.pos = i
        new = "".join(out)
        self.text += new
        return new


def _unicode_escape(raw: str, i: int) -> tuple[str, int]:
    """The character of the \\uXXXX escape at raw[i] (a surrogate pair's two escapes together) and how many
    characters it took; 0 when it is not complete yet."""
    if i + 6 > len(raw):
        return "", 0
    code = int(raw[i + 2:i + 6], 16)
    if 0xD800 <= code < 0xDC00:  # the first half of a pair: the second must follow
        if i + 12 > len(raw):
            return "", 0
        if raw[i + 6:i + 8] == "\\u":
            low = int(raw[i + 8:i + 12], 16)
            if 0xDC00 <= low < 0xE000:
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), 12
        return "\ufffd", 6
    return ("\ufffd" if 0xDC00 <= code < 0xE000 else chr(code)), 6


def _function(tool: object, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise ApiError(f'{where} must be {{"type": "function", "function": {{"name": …, "parameters": …}}}}',
                       param="tools", code="invalid_type")
    f = tool["function"]
    name = f.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(f"{where}.function.name must be 1-64 letters, digits, _ or -", param="tools",
                       code="invalid_value")
    description = f.get("description") or ""
    if not isinstance(description, str):
        raise ApiError(f"{where}.function.description must be a string", param="tools", code="invalid_type")
    parameters = f.get("parameters") or {"type": "object", "properties": {}}
    try:
        grammars.from_schema(parameters, f"{where}.function.parameters")  # refused here, naming the tool
    except UserError as e:
        raise ApiError(str(e), param="tools", code="invalid_schema") from None
    return {"name": name, "description": description[:2000], "parameters": parameters}


def _choice(choice: object, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice  # type: ignore[return-value]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in names:
            return name
        raise ApiError(f"tool_choice names {str(name)[:64]!r}, which is not among the tools ({', '.join(names)})",
                       param="tool_choice", code="invalid_value")
    raise ApiError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": …}}',
                   param="tool_choice", code="invalid_value")


# --- the conversation back into the prompt ---------------------------------------------------------------------

def call_text(calls: object, where: str) -> str:
    """An assistant message's tool_calls (OpenAI's, arguments a JSON string; or Ollama's, an object) as the JSON the
    model writes for them."""
    if not isinstance(calls, list) or not calls:
        raise ApiError(f"{where}.tool_calls must be a non-empty array", param="messages", code="invalid_type")
    items = []
    for call in calls:
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ApiError(f"{where}.tool_calls: each needs function.name", param="messages", code="invalid_type")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:  # the client's JSON: bounded in depth and numbers (app.files.parse_json)
                args = files.parse_json(args, f"{where}.tool_calls: arguments") if args.strip() else {}
            except UserError as e:
                raise ApiError(str(e), param="messages", code="invalid_value") from None
        items.append({"name": f["name"], "arguments": args})
    value = {"tool_call": items[0]} if len(items) == 1 else {"tool_calls": items}
    return json.dumps(value, ensure_ascii=False)


def result_text(name: str | None, content: str) -> str:
    """A tool's result (a `role: "tool"` message) as the user turn the model reads it in."""
    return json.dumps({"tool_response": {"name": name or "", "content": content}}, ensure_ascii=False)
