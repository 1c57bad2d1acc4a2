"""A chat request's messages as the model's prompt: OpenAI's and Ollama's /chat both come through here.

Roles system (or developer), user and assistant map onto the model's chat format; the tool roles of a conversation
with tool calls (an assistant's `tool_calls`, a `tool` message with the result) become turns in the JSON the model
writes and reads them in (app.serve.tools), and the tools themselves join the system text.
"""

from __future__ import annotations

from malhae.serve import tools as tool_calls
from malhae.serve.errors import ApiError
from malhae.serve.tools import Tools

MAX_MESSAGES = 10_000


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"messages[{i}].content: only text parts are supported (this model reads text)",
                               param="messages", code="unsupported")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"messages[{i}].content must be a string or an array of text parts", param="messages",
                   code="invalid_type")


def render_chat(svc, messages: object, tools: Tools | None = None) -> str:
    """The prompt for a message list, in the model's chat format (its GGUF template, else malhae's by name)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty array", param="messages", code="invalid_type")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    if len(messages) > MAX_MESSAGES:
        raise ApiError(f"{len(messages)} messages; at most {MAX_MESSAGES} in one request", param="messages",
                       code="invalid_value")
    called: dict[str, str] = {}  # tool_call_id → the tool's name, for the results that follow
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object", param="messages", code="invalid_type")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_content(m, i))
        elif role == "user":
            turns.append((role, _content(m, i)))
        elif role == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"] if isinstance(m["tool_calls"], list) else ():
                f = call.get("function") if isinstance(call, dict) else None
                if isinstance(call.get("id"), str) and isinstance(f, dict):
                    called[call["id"]] = str(f.get("name", ""))
            turns.append((role, tool_calls.call_text(m["tool_calls"], f"messages[{i}]")))
        elif role == "assistant":
            turns.append((role, _content(m, i)))
        elif role == "tool":
            name = m.get("name") or m.get("tool_name") or called.get(str(m.get("tool_call_id")))
            turns.append(("user", tool_calls.result_text(name if isinstance(name, str) else None, _content(m, i))))
        else:
            raise ApiError(f"messages[{i}].role must be system, user, assistant or tool, not {role!r}",
                           param="messages", code="invalid_value")
    if not turns or turns[-1][0] != "user":
        raise ApiError("the last message must be the user's or a tool's (the model answers it)", param="messages",
                       code="invalid_value")
    text = "\n".join(system) if system else svc.system  # the request's system messages, else the model's own
    if tools is not None:
        text = f"{svc.template.system if text is None else text}\n\n{tools.instructions()}".strip()
    # composed here, once for every message (OpenAI's and Ollama's chat): app.nfc
    return svc.compose(svc.chat_prompt(turns, system=text))
