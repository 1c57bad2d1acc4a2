"""Structured output and tool calls through `malhae serve` over real HTTP: OpenAI's response_format (the openai
SDK's `parse` with a pydantic model), llama-server's json_schema and grammar fields, Ollama's format, and tool calls
read back into OpenAI's and Ollama's shapes. No mocks: real llama.cpp on the demo model, real clients.

The demo model never closes a free JSON string on its own (it rambles until max_tokens), so the schemas that must
give finished answers bound their strings with maxLength; a schema bounded everywhere has a longest answer, and a
max_tokens above it means every answer must finish.
"""

from __future__ import annotations

import enum
import http.client
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

from helpers import serving  # noqa: E402

WORKERS = 4  # the server's slots: requests of one test run side by side


@pytest.fixture(scope="module")
def server(demo_path):
    with serving(demo_path, parallel=WORKERS, n_ctx=1024) as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def request(server, path: str, body: object = None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one POST."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def each(fn, seeds):
    """fn(seed) for every seed, as many at once as the server has slots."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(fn, seeds))


def json_prefix(text: str) -> bool:
    """Whether `text` is the beginning of some JSON value (an answer cut by max_tokens): closing its open string,
    dropping a half-written literal, number or trailing comma, and closing its brackets must give valid JSON."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and (not stack or stack.pop() != ch):
            return False
    if in_string:
        text = (text[:-1] if escaped else re.sub(r"\\u[0-9a-fA-F]{0,3}$", "", text)) + '"'
    closers = "".join(reversed(stack))
    for cut in range(8):
        if cut and not re.fullmatch(r"[\sA-Za-z0-9.+\-,]", text[-cut]):
            break
        base = text[:len(text) - cut]
        for middle in ("", "null", ":null"):
            try:
                json.loads(base + middle + closers)
                return True
            except ValueError:
                pass
    return False


def test_json_prefix_tells_a_cut_answer_from_other_text():
    assert all(json_prefix(t) for t in ('{', '{ "이름": "홍', '{"a": [1, 2', '{"a": tr', '{"a": -', '{"a": 1,',
                                        '{"a', '{"a": "\\', '{"a": "\\u00', '{"a": {"b": []}, "c": 1.5e'))
    assert not any(json_prefix(t) for t in ('이름: 홍', '{"a": 1}} x', '{"a": 1] ', '{"a" "b"', 'x{"a": 1}'))


# --- 1. the openai SDK's parse with a pydantic model ----------------------------------------------------------

class 기분(str, enum.Enum):
    긍정 = "긍정"
    부정 = "부정"


class 리뷰(pydantic.BaseModel):
    감정: 기분
    요약: str = pydantic.Field(max_length=20)
    점수: int = pydantic.Field(ge=1, le=5)


def test_openai_parse_gives_the_pydantic_model_with_korean_fields(server):
    c = client(server)
    parse = getattr(c.chat.completions, "parse", None) or c.beta.chat.completions.parse
    messages = [{"role": "user", "content": "이 영화 정말 좋았어요. 리뷰를 분석해 주세요."}]

    def ask(seed):
        return parse(model="m", messages=messages, response_format=리뷰, temperature=0.8, seed=seed,
                     max_tokens=200).choices[0]

    choices = each(ask, range(20))
    for choice in choices:
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, 리뷰)
        assert 리뷰.model_validate_json(choice.message.content) == choice.message.parsed
        word = json.loads(choice.message.content)["감정"]
        assert word in ("긍정", "부정") and f'"{word}"' in choice.message.content  # the words, not \u escapes
        assert 1 <= choice.message.parsed.점수 <= 5 and len(choice.message.parsed.요약) <= 20
    assert len({c.message.content for c in choices}) > 1  # the seeds were used


# --- 2. the ollama client: format as a schema, and "json" ------------------------------------------------------

def test_ollama_format_schema_and_json(server):
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=server.url, timeout=120)
    messages = [{"role": "user", "content": "이 식당 리뷰를 분석해 주세요: 음식이 맛없었어요."}]

    def chat(seed):
        return c.chat(model="m", messages=messages, format=리뷰.model_json_schema(),
                      options={"seed": seed, "temperature": 0.8, "num_predict": 200})

    for out in each(chat, range(4)):
        assert out.done_reason == "stop", out
        리뷰.model_validate_json(out.message.content)

    def generate(seed):
        return c.generate(model="m", prompt="회원 정보를 JSON으로 주세요.", format="json",
                          options={"seed": seed, "temperature": 0.8, "num_predict": 24})

    for out in each(generate, range(6)):
        assert out.done_reason in ("stop", "length"), out
        if out.done_reason == "stop":
            assert isinstance(json.loads(out.response), dict), out.response
        else:
            assert out.eval_count == 24 and out.response.lstrip().startswith("{") and json_prefix(out.response), \
                out.response


# --- 3. a nested schema: chat response_format, completions json_schema, n, streaming ---------------------------

PERSON = {
    "type": "object",
    "properties": {
        "이름": {"type": "string", "maxLength": 8},
        "나이": {"type": "integer", "minimum": 0, "maximum": 120},
        "주소": {"type": "object",
                 "properties": {"도시": {"enum": ["서울", "부산", "대구"]},
                                "우편번호": {"type": "string", "maxLength": 5}},
                 "required": ["도시"], "additionalProperties": False},
        "취미": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "점수": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "minItems": 2,
                 "maxItems": 2},
        "회원": {"type": "boolean"},
    },
    "required": ["이름", "나이", "주소", "취미"],
    "additionalProperties": False,
}
LONGEST = 400  # tokens: more than the longest answer PERSON allows, so every answer must finish


def _person(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


def test_nested_schema_through_chat_and_completions(server):
    c = client(server)
    messages = [{"role": "user", "content": "가상의 회원 한 명을 만들어 주세요."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def chat(seed):
        return c.chat.completions.create(model="m", messages=messages, response_format=response_format,
                                         temperature=0.8, seed=seed, max_tokens=LONGEST).choices[0]

    def complete(seed):
        return c.completions.create(model="m", prompt="회원 정보(JSON):", temperature=0.8, seed=seed,
                                    max_tokens=LONGEST, extra_body={"json_schema": PERSON}).choices[0]

    chats, completions = each(chat, range(4)), each(complete, range(4))
    for choice in chats:
        assert choice.finish_reason == "stop", choice
        _person(choice.message.content)
    for choice in completions:
        assert choice.finish_reason == "stop", choice
        _person(choice.text)
    assert len({choice.text for choice in completions}) > 1


def test_n_answers_of_one_request_all_follow_the_grammar(server):
    out = client(server).completions.create(model="m", prompt="회원 정보(JSON):", n=3, temperature=0.8, seed=5,
                                            max_tokens=LONGEST, extra_body={"json_schema": PERSON})
    assert [choice.finish_reason for choice in out.choices] == ["stop"] * 3
    answers = [_person(choice.text) for choice in out.choices]
    assert len({json.dumps(a, ensure_ascii=False) for a in answers}) > 1  # n seeds, not one answer three times


def test_streamed_structured_answer_equals_the_whole_one(server):
    c = client(server)
    args = {"model": "m", "messages": [{"role": "user", "content": "회원 한 명의 정보를 주세요."}], "temperature": 0,
            "max_tokens": LONGEST,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    whole = c.chat.completions.create(**args).choices[0]
    chunks = list(c.chat.completions.create(**args, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.finish_reason == "stop" and chunks[-1].choices[0].finish_reason == "stop"
    assert streamed == whole.message.content
    _person(streamed)
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 3  # streamed as it was written


def test_logprobs_come_with_a_constrained_answer(server):
    """Log-probabilities are the model's own (before the grammar, as before temperature): one per generated token,
    each the model's log-probability of the token the grammar let through, so a forced token may be unlikely."""
    out = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "회원 한 명의 정보를 주세요."}], temperature=0,
        max_tokens=LONGEST, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    choice = out.choices[0]
    _person(choice.message.content)
    entries = choice.logprobs.content
    assert len(entries) == out.usage.completion_tokens
    # a forced key may come out in byte tokens ("bytes:\\xec"): their bytes make the text
    assert bytes(b for e in entries for b in e.bytes).decode().strip() == choice.message.content.strip()
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    # somewhere the grammar overruled the model: the token taken is not its likeliest
    assert any(e.logprob < e.top_logprobs[0].logprob - 1e-6 for e in entries)


# --- 4. GBNF ---------------------------------------------------------------------------------------------------

def test_gbnf_grammar_allows_only_its_words(server):
    c = client(server)

    def complete(seed):
        prompt = ["질문: 하늘은 파란가요? 답:", "대한민국은 민주공화국인가요?", "국회는"][seed % 3]
        return c.completions.create(model="m", prompt=prompt, temperature=0.8, seed=seed, max_tokens=8,
                                    extra_body={"grammar": 'root ::= ("예" | "아니요")'}).choices[0]

    for choice in each(complete, range(9)):
        assert choice.text in ("예", "아니요") and choice.finish_reason == "stop", choice


# --- 5. json_object ---------------------------------------------------------------------------------------------

def test_json_object_answers_are_objects_or_cut_prefixes(server):
    c = client(server)

    def chat(seed):
        return c.chat.completions.create(model="m", messages=[{"role": "user", "content": "JSON으로 답해 주세요."}],
                                         response_format={"type": "json_object"}, temperature=0.8, seed=seed,
                                         max_tokens=24)

    for out in each(chat, range(6)):
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice
        else:
            assert choice.finish_reason == "length" and out.usage.completion_tokens == 24, choice
            assert choice.message.content.lstrip().startswith("{") and json_prefix(choice.message.content), choice


# --- 6. tool calls ---------------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"도시": {"type": "string", "maxLength": 10}}, "required": ["도시"]}
CLOCK = {"type": "object", "properties": {"시간대": {"enum": ["KST", "UTC"]}, "초": {"type": "boolean"}},
         "required": ["시간대"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "도시의 날씨", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "지금 시각", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "서울 날씨 알려줘"}]
WILD = {"temperature": 3.0, "extra_body": {"top_k": 0, "top_p": 1, "min_p": 0}}  # see test_tool_choice_auto…


def _valid_call(call, names=("get_weather",)) -> dict:
    assert call.type == "function" and call.id and call.function.name in names, call
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_required_tool_call_and_the_conversation_after_it(server):
    c = client(server)

    def ask(seed):
        return c.chat.completions.create(model="m", messages=ASK, tools=TOOLS[:1], tool_choice="required",
                                         temperature=0.8, seed=seed, max_tokens=100).choices[0]

    choices = each(ask, range(4))
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        _valid_call(choice.message.tool_calls[0])
    call = choices[0].message.tool_calls[0]

    def answer(result: str):
        messages = [*ASK, choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": result}]
        return c.chat.completions.create(model="m", messages=messages, tools=TOOLS[:1], tool_choice="none",
                                         temperature=0, max_tokens=12)

    short, long = answer("맑음"), answer("맑음, 기온 20도, 습도 40%, 바람 약함, 미세먼지 좋음")
    reply = short.choices[0]
    assert reply.finish_reason in ("stop", "length") and reply.message.tool_calls is None
    assert isinstance(reply.message.content, str) and reply.message.content
    assert long.usage.prompt_tokens > short.usage.prompt_tokens  # the tool's result is in the prompt


def test_streamed_tool_call_assembles(server):
    stream = client(server).chat.completions.create(model="m", messages=ASK, tools=TOOLS[:1], tool_choice="required",
                                                    temperature=0.8, seed=3, max_tokens=100, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                if part.function:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0], calls
    assert calls[0]["id"] and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_tool_choice_naming_a_function_always_calls_it(server):
    c = client(server)
    choice = {"type": "function", "function": {"name": "get_time"}}

    def ask(seed):
        return c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0.8,
                                         seed=seed, max_tokens=100).choices[0]

    for out in each(ask, range(4)):
        assert out.finish_reason == "tool_calls", out
        assert [call.function.name for call in out.message.tool_calls] == ["get_time"]
        _valid_call(out.message.tool_calls[0], ("get_time",))


def test_tool_choice_auto_gives_a_call_or_a_reply(server):
    """The demo model, left to choose, replies rather than calls at ordinary temperatures; flattened (temperature 3,
    no top-k/top-p/min-p) it does both. Four tokens show which way an answer goes (`{ "t…` or `{ "r…`); some of
    each are asked again in full, and each answer must have its shape."""
    c = client(server)

    def ask(seed, most):
        return c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="auto", seed=seed,
                                         max_tokens=most, **WILD).choices[0]

    starts = each(lambda seed: ask(seed, 4), range(24))
    for out in starts:  # cut before a reply began: the JSON they were being written as
        assert out.finish_reason == "length" and out.message.tool_calls is None, out
        assert out.message.content.lstrip().startswith("{") and json_prefix(out.message.content), out
    calling = [seed for seed, out in enumerate(starts) if '"t' in out.message.content]
    replying = [seed for seed, out in enumerate(starts) if '"r' in out.message.content]
    assert calling and replying, [out.message.content for out in starts]
    full = each(lambda seed: ask(seed, 100), calling[:3] + replying[:1])
    for out in full:
        if out.finish_reason == "tool_calls":
            assert out.message.content is None and len(out.message.tool_calls) == 1, out
            _valid_call(out.message.tool_calls[0], tuple(SCHEMAS))
        else:  # a reply: its text, finished or (cut) what there was of it — never the JSON around it
            assert out.message.tool_calls is None and isinstance(out.message.content, str), out
            assert out.finish_reason in ("stop", "length") and not out.message.content.lstrip().startswith("{"), out
    assert any(out.finish_reason == "tool_calls" for out in full), full


def test_a_reply_beside_tools_streams_as_it_is_written(server):
    """A plain reply under tool_choice auto is JSON ({"response": "…"}) to the grammar, but a streaming client (Open
    WebUI with tools on) sees its text arrive piece by piece, as without tools, and the pieces make the whole
    answer's content; on Ollama's /api/chat too. Greedy (the demo replies rather than calls then), so that the two
    requests are the same answer whatever each slot had cached."""
    c = client(server)
    args = {"model": "m", "messages": ASK, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 60, "temperature": 0}
    whole = c.chat.completions.create(**args).choices[0]
    pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(**args, stream=True)
              if ch.choices and ch.choices[0].delta.content]
    assert whole.message.tool_calls is None and not whole.message.content.lstrip().startswith("{"), whole
    assert "".join(pieces) == whole.message.content and len(pieces) > 3, pieces
    body = {"model": "m", "messages": ASK, "tools": TOOLS, "options": {"num_predict": 60, "temperature": 0}}
    _, text = request(server, "/api/chat", body | {"stream": True})  # NDJSON: lines of JSON
    streamed = [line["message"]["content"] for line in map(json.loads, text.splitlines()) if not line["done"]]
    _, one = request(server, "/api/chat", body | {"stream": False})
    assert "".join(streamed) == one["message"]["content"] == whole.message.content and len(streamed) > 3, streamed


def test_parallel_tool_calls_give_a_list(server):
    c = client(server)

    def ask(seed):
        return c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=True, temperature=0.8, seed=seed,
                                         max_tokens=300).choices[0]

    for out in each(ask, range(4)):
        assert out.finish_reason == "tool_calls" and 1 <= len(out.message.tool_calls) <= 8, out
        for call in out.message.tool_calls:
            _valid_call(call, tuple(SCHEMAS))
        assert len({call.id for call in out.message.tool_calls}) == len(out.message.tool_calls)


def test_ollama_client_tool_calls(server):
    """Ollama has no tool_choice: the model chooses, so (see test_tool_choice_auto…) temperature 3 lets it call.
    Four tokens show which way an answer goes (`{ "t…` or `{ "r…`); the seeds that call are asked again in full.
    The parameter is bounded by an enum: the ollama client drops maxLength from a tool's parameters."""
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=server.url, timeout=120)
    city = {"type": "object", "properties": {"도시": {"type": "string", "enum": ["서울", "부산", "대구"]}},
            "required": ["도시"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]
    options = {"temperature": 3.0, "top_k": 0, "top_p": 1, "min_p": 0}

    def chat(seed, most):
        return c.chat(model="m", messages=ASK, tools=tools, options=options | {"seed": seed, "num_predict": most})

    starts = each(lambda seed: chat(seed, 4), range(24))
    assert all(out.done_reason == "length" and not out.message.tool_calls and json_prefix(out.message.content)
               for out in starts), starts
    calling = [seed for seed, out in enumerate(starts) if '"t' in out.message.content]
    assert calling, "no seed of 24 began a tool call"
    called = [out for out in each(lambda seed: chat(seed, 100), calling[:4]) if out.message.tool_calls]
    assert called, "the seeds that began a call did not call"
    for out in called:
        assert out.done_reason == "stop" and out.message.content == "", out
        assert [call.function.name for call in out.message.tool_calls] == ["get_weather"]
        jsonschema.validate(dict(out.message.tool_calls[0].function.arguments), city)
    # the call (Ollama's shape: arguments an object) and its result, rendered back: a plain answer follows
    call = called[0].message.tool_calls[0].function
    messages = [*ASK, {"role": "assistant", "content": "",
                       "tool_calls": [{"function": {"name": call.name, "arguments": dict(call.arguments)}}]},
                {"role": "tool", "content": "맑음", "tool_name": call.name}]
    out = c.chat(model="m", messages=messages, options={"temperature": 0, "num_predict": 8})
    assert out.done_reason in ("stop", "length") and out.message.content and not out.message.tool_calls, out


# --- 7. mistakes: a 4xx JSON naming the field, and the server goes on -----------------------------------------

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "안녕"}]
LOOP = {"type": "object", "properties": {"다음": {"$ref": "#"}}, "required": ["다음"]}
BAD = [  # path, body, status, the field (param; for Ollama, in the message), words the message must hold
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     400, "response_format", "must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "json_schema": "object"}, 400, "json_schema", "json_schema"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "xml"}}, 400, "response_format", "'xml'"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                           "schema": LOOP}}},
     400, "response_format", "recursive"),
    ("/v1/completions", {"prompt": "x", "json_schema": {"type": "array", "uniqueItems": True,
                                                        "items": {"type": "number", "multipleOf": 2}}},
     400, "json_schema", "multipleOf, uniqueItems"),
    ("/v1/completions", {"prompt": "x", "grammar": 'root ::= ("예" | '}, 400, "grammar", "expecting"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= 낱말"}, 400, "grammar", "낱말"),
    (CHAT, {"messages": MSGS, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}},
     400, "tool_choice", "rm_rf"),
    (CHAT, {"messages": MSGS, "tools": TOOLS, "response_format": {"type": "json_object"}}, 400, "tools",
     "response format"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= \"a\"", "json_schema": {"type": "object"}}, 400,
     "grammar", "json_schema and grammar both"),
    (CHAT, {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "multipleOf": 3}}}}}]}, 400, "tools", "multipleOf"),
    ("/api/chat", {"model": "m", "messages": MSGS, "format": 42, "stream": False}, 400, "format", "json"),
    ("/api/generate", {"model": "m", "prompt": "x", "format": {"type": "object", "not": {}}, "stream": False}, 400,
     "format", "uses not"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD,
                         ids=[f"{p.strip('/').replace('/', '.')}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_structured_requests_get_4xx_json_naming_the_field(server, path, body, status, param, words):
    got, out = request(server, path, body)
    assert got == status, out
    if path.startswith("/api/"):  # Ollama's shape: the message alone
        message = out["error"]
        assert isinstance(message, str) and param in message, out
    else:
        message = out["error"]["message"]
        assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error", out
    assert words in message and "\n" not in message, out
    if "grammar" in body:  # llama.cpp's reason, not its dump of the grammar or its parse stack
        assert "::=" not in message and len(message) < 200, out
    _still_answers(server)


def test_a_body_over_8_mib_is_413(server):
    schema = {"type": "object", "description": "가" * (3 << 20)}  # 9 MiB of UTF-8
    got, out = request(server, "/v1/completions", raw=json.dumps({"prompt": "x", "json_schema": schema},
                                                                  ensure_ascii=False).encode())
    assert got == 413 and out["error"]["code"] == "body_too_large" and "8 MiB" in out["error"]["message"], out
    _still_answers(server)


def _still_answers(server) -> None:
    got, out = request(server, "/v1/completions", {"prompt": "대한민국은", "max_tokens": 2, "temperature": 0,
                                                   "grammar": 'root ::= "예"'})
    assert got == 200 and out["choices"][0]["text"] == "예", out


def test_reply_decodes_a_json_string_however_it_is_cut():
    """The reply's characters from its JSON as it comes, in pieces of any size: escapes (a \\uXXXX pair split
    across pieces too) decoded exactly as json.loads does, nothing before the reply began, nothing after it ended."""
    from malhae.serve.tools import Reply

    text = "안녕\n\"하세요\" \\ 😀 é/\t끝"
    for ascii_only in (True, False):
        answer = json.dumps({"response": text}, ensure_ascii=ascii_only) + " "
        for size in (1, 2, 3, 5, 7, 64):
            reply = Reply()
            out = "".join(reply.feed(answer[i:i + size]) for i in range(0, len(answer), size))
            assert out == text and reply.text == text and reply.ended, (size, out)
    call = Reply()
    assert call.feed('{ "tool_call" : { "name" : "get_weather", "response": "x"') == "" and not call.started


def test_a_cut_reply_is_what_there_was_of_it():
    from malhae.serve.tools import Tools

    tools = Tools.read(TOOLS)
    assert tools.parse('{ "response" : "서울은 맑\\uc74c') == ("서울은 맑음", [])
    assert tools.parse('{ "tool_call" : { "name" : "get_w') == ('{ "tool_call" : { "name" : "get_w', [])


def test_tool_call_arguments_in_the_history_are_bounded_json(server):
    """A conversation's earlier call carries its arguments as a JSON string the client wrote: 100,000 brackets deep
    is a 400 naming it, as broken JSON is, not a server error."""
    for arguments, words in (("[" * 100_000 + "]" * 100_000, "nested more than"), ("{oops", "not valid JSON")):
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "맑음"}]
        status, out = request(server, CHAT, {"messages": history, "tools": TOOLS, "max_tokens": 4})
        assert status == 400 and words in out["error"]["message"] and out["error"]["param"] == "messages", out
