"""Constrained decoding (app/runtime/grammar.py, app/runtime/sampler.py): a schema is checked before any model is
touched and every refusal says what is wrong in one line; integer bounds are exact; GBNF is llama.cpp's to parse and
its complaint comes back in one line with nothing on stderr; and on the demo model the answers follow their schema,
with the narrowed retry and speculation choosing exactly the tokens plain, whole-vocabulary masking chooses.

The demo rambles inside JSON strings (it quotes its training text), so the schemas here bound their strings with
maxLength: answers then finish well inside max_tokens and the tests can look at whole answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import llama_cpp as lc
import pytest

from malhae.errors import UserError
from malhae.runtime import grammar, ranges, sampler
from malhae.runtime.engine import Engine
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.runtime.speculate import DraftLength

PROMPT = "사용자: 자기소개를 JSON으로 해 주세요.\n어시스턴트:"
SHORT = {"type": "string", "maxLength": 6}
PERSON = {
    "type": "object",
    "properties": {
        "이름": SHORT,
        "나이": {"type": "integer", "minimum": 0, "maximum": 120},
        "주소": {"type": "object",
                 "properties": {"도시": SHORT, "우편번호": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                 "required": ["도시"]},  # 우편번호 is optional
        "취미": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3},
        "기분": {"enum": ["좋음", "나쁨", "보통"]},
        "학생": {"type": "boolean"},
    },
    "required": ["이름", "나이", "주소", "취미", "기분", "학생"],
}


def one_core(model, **options) -> LoadOptions:
    """One thread: llama.cpp's threads wait for each other spinning, and on a 2-core machine shared with other work a
    decode with two then costs up to 40 times as much; the answers are the same."""
    return LoadOptions(model=model, ctx=512, threads=1, gpu_layers=0, **options)


@pytest.fixture(scope="module")
def engine(demo_path):
    with Engine(one_core(demo_path)) as e:
        yield e


def is_json_prefix(text: str) -> bool:
    """Whether some text after `text` makes a JSON document: the open string, escape, literal or number is finished
    in each way it could be, then the open objects and arrays are closed, and json.loads judges."""
    closers, in_string, escape, hex_left = [], False, False, 0
    for c in text:
        if hex_left:
            hex_left -= 1
        elif escape:
            escape, hex_left = False, 4 if c == "u" else 0
        elif in_string:
            escape, in_string = c == "\\", c != '"'
        elif c == '"':
            in_string = True
        elif c in "{[":
            closers.append("}" if c == "{" else "]")
        elif c in "}]" and closers:
            closers.pop()
    string_end = ("n" if escape else "") + "0" * hex_left + ('"' if in_string else "")
    ends = ["", "0", ":0", '"":0', "e", "l", "ll", "ue", "rue", "se", "lse", "alse", "ull"]
    for end in ends:
        try:
            json.loads(text + string_end + end + "".join(reversed(closers)))
            return True
        except json.JSONDecodeError:
            pass
    return False


def test_the_prefix_check_itself():
    whole = json.dumps({"a": [1, -2.5e3, True, None, {"b": "\\\"\u0001x"}], "다": False, "e": {}}, ensure_ascii=True)
    assert all(is_json_prefix(whole[:n]) for n in range(len(whole) + 1))
    for bad in ['x', '{]', '{"a" 1', '[1,,', '{"a":1}}', 'tx', '{"a":-}', '[01']:
        assert not is_json_prefix(bad), bad


# --- 1. schemas refused, in one line that names the problem ---------------------------------------------------

def nested(depth: int) -> dict:
    node: dict = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "array", "items": node}
    return node


REFUSED = [
    ([1, 2], ["must be a JSON object", "list"]),
    ('{"type": "object"}', ["must be a JSON object", "str"]),
    ({"type": "object", "properties": {"a": 3}}, ["subschema must be an object", "3"]),
    ({"type": "array", "items": "string"}, ["subschema must be an object", '"string"']),
    ({"type": "strnig"}, ["unknown type", "strnig", "string"]),
    ({"type": []}, ["unknown type"]),
    ({"type": "object", "patternProperties": {"^x": {}},
      "properties": {"a": {"type": "array", "uniqueItems": True}, "b": {"not": {"type": "null"}},
                     "c": {"type": "string", "minimum": 0}}},
     ["uniqueItems", "not", "minimum (on string)", "patternProperties", "remove them"]),
    ({"type": "object", "properties": {"a": True}}, ["`true` schema"]),
    ({"anyOf": [{"type": "null"}, False]}, ["`false` schema"]),
    ({"$ref": "#"}, ["recursive without a way out"]),
    ({"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}, ["recursive without a way out"]),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}, "$ref": "#/$defs/n"},
     ["recursive without a way out"]),
    ({"type": "string", "description": "x" * (10 << 20)}, ["bytes", f"{grammar.MAX_SCHEMA_BYTES:,}"]),
    (nested(40), ["nested more than 32"]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10 ** 9}, ["minItems", "0 to 1000"]),
    ({"type": "string", "minLength": 5, "maxLength": 2}, ["minLength 5", "maxLength 2"]),
    ({"$ref": "http://example.com/person.json"}, ["$ref", "http://example.com/person.json", "#/$defs"]),
    ({"$ref": "#/$defs/missing"}, ["#/$defs/missing", "points at nothing"]),
    ({"enum": []}, ["enum", "non-empty"]),
    ({"type": "string", "pattern": 5}, ["pattern must be a string"]),
    ({"type": "integer", "minimum": 10, "maximum": 3}, ["no integer", "10", "3"]),
    ({"type": "integer", "maximum": 10 ** 20}, ["maximum", "15 digits"]),
]


@pytest.mark.parametrize("schema, words", REFUSED, ids=range(len(REFUSED)))
def test_schema_refused_in_one_line(schema, words):
    with pytest.raises(UserError) as caught:
        grammar.from_schema(schema, "--schema")
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400 and message.startswith("--schema")
    for word in words:
        assert word in message


ACCEPTED = [
    {"type": "object", "properties": {"next": {"$ref": "#"}}},  # optional: {} ends it
    {"type": "array", "items": {"$ref": "#"}},  # minItems 0: [] ends it
    # pydantic's shape for a recursive model: $ref and $defs side by side at the root, a Korean definition name
    {"$defs": {"노드": {"type": "object", "required": ["이름"],
                      "properties": {"이름": {"type": "string", "maxLength": 4},
                                     "자식": {"type": "array", "items": {"$ref": "#/$defs/노드"}, "maxItems": 2}}}},
     "$ref": "#/$defs/노드"},
    {"type": "object", "required": ["값"],
     "properties": {"값": {"type": "integer", "minimum": 0, "maximum": 9}, "다음": {"$ref": "#"}}},
    {"type": "object", "additionalProperties": False, "properties": {"a": {"$ref": "#/properties/b"},
                                                                     "b": {"type": "string", "format": "date"}}},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "끝"}], "items": False},
]


@pytest.mark.parametrize("schema", ACCEPTED, ids=range(len(ACCEPTED)))
def test_schema_accepted_and_llama_cpp_parses_it(engine, schema):
    g = grammar.from_schema(schema)
    sampler.check_grammar(engine.vocab, g)
    assert g.is_json and g.schema == schema


def test_recursive_schema_answers_follow_it(engine):
    schema = ACCEPTED[2]
    g = grammar.from_schema(schema)
    finished = 0
    for seed in range(3):
        text, stats = engine.complete(PROMPT, Sampling(temperature=0.8, seed=seed, max_tokens=120, grammar=g))
        if stats.stop_reason == "eos":
            finished += 1
            jsonschema.validate(json.loads(text), schema)
        else:
            assert is_json_prefix(text), text
    assert finished
    # the demo follows an optional recursive property down as far as max_tokens lets it: still a JSON beginning
    g = grammar.from_schema(ACCEPTED[3])
    text, stats = engine.complete(PROMPT, Sampling(temperature=0, max_tokens=60, grammar=g))
    assert text.count('"다음"') >= 3 and is_json_prefix(text), text


# --- 2. integer bounds, checked against a regex made from the GBNF ---------------------------------------------

TOP = 10 ** 16 - 1  # the port's integers: at most 16 digits


def gbnf_regex(expr: str, literal: str = r'"-?[0-9]*"', operators: str = "()|") -> re.Pattern:
    """A GBNF digit-range expression as a Python regex: "…" literals (of the form `literal`), [a-b] classes and the
    `operators` (parentheses, |, and for decimals ? * +), each meaning the same in a regex; spaces only separate."""
    out = []
    for token in re.findall(r'"[^"]*"|\[[^\]]*\]|\S', expr):
        if token.startswith('"'):
            assert re.fullmatch(literal, token), token
            out.append(re.escape(token[1:-1]))
        elif token.startswith("["):
            assert re.fullmatch(r"\[[0-9]-[0-9]\]", token), token
            out.append(token)
        else:
            assert token in operators, f"{token!r} in {expr}"
            out.append(token)
    return re.compile("".join(out))


def rules(gbnf: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in gbnf.splitlines() if " ::= " in line)


def inside(n: int, bounds: dict) -> bool:
    return (abs(n) <= TOP and n >= bounds.get("minimum", -TOP) and n > bounds.get("exclusiveMinimum", -TOP - 1)
            and n <= bounds.get("maximum", TOP) and n < bounds.get("exclusiveMaximum", TOP + 1))


BOUNDS = [
    {"minimum": 7, "maximum": 123},
    {"minimum": 0, "maximum": 0},
    {"minimum": -15, "maximum": -3},
    {"minimum": 95, "maximum": 1005},
    {"minimum": -120, "maximum": 45},
    {"minimum": -9, "maximum": 9},
    {"minimum": -100, "maximum": -100},
    {"minimum": 1, "maximum": 99999},
    {"minimum": -1000, "maximum": 999},
    {"minimum": 5},
    {"minimum": -37},
    {"maximum": 250},
    {"maximum": -7},
    {"exclusiveMinimum": 0, "exclusiveMaximum": 10},
    {"exclusiveMinimum": -10.5, "maximum": 3.7},
    {"minimum": 1.5, "exclusiveMaximum": 100},
    {"minimum": 10, "exclusiveMinimum": 12, "maximum": 99, "exclusiveMaximum": 50},
    {"exclusiveMaximum": 0},
]


@pytest.mark.parametrize("bounds", BOUNDS, ids=[json.dumps(b) for b in BOUNDS])
def test_integer_bounds_are_exact(engine, bounds):
    g = grammar.from_schema({"type": "integer", **bounds})
    sampler.check_grammar(engine.vocab, g)
    body = rules(g.gbnf)["root"]
    assert body.endswith(" space")
    pattern = gbnf_regex(body.removesuffix(" space"))
    edges = [0, TOP, -TOP, *(v for v in bounds.values())]
    window = {n for e in edges for n in range(int(e) - 30, int(e) + 31)}
    lo, hi = bounds.get("minimum", -TOP), bounds.get("maximum", TOP)
    if hi - lo <= 3000:
        window |= set(range(int(lo), int(hi) + 1))
    window |= {10 ** k for k in range(18)} | {-(10 ** k) for k in range(18)} | {TOP + 1, -TOP - 1}
    wrong = [n for n in sorted(window) if bool(pattern.fullmatch(str(n))) != inside(n, bounds)]
    assert not wrong, wrong[:10]
    for text in ("-0", "00", "007", "-05", "+5", "", "-", "1.0", " 5"):
        assert not pattern.fullmatch(text), text


@pytest.mark.parametrize("lo, hi", [(None, None), (-3, None), (None, 3), (0, 10 ** 15), (-(10 ** 15), -1)])
def test_int_range_without_a_schema(lo, hi):
    pattern = gbnf_regex(ranges.integers(lo, hi))
    bounds = {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
    window = {n for e in (0, TOP, -TOP, lo or 0, hi or 0) for n in range(e - 30, e + 31)}
    assert [n for n in sorted(window) if bool(pattern.fullmatch(str(n))) != inside(n, bounds)] == []
    assert not pattern.fullmatch("-0") and not pattern.fullmatch("01")


# --- 3. GBNF ------------------------------------------------------------------------------------------------

YES_NO = 'root ::= ("예" | "아니요")'
QUESTION = "사용자: 모든 국민은 법 앞에 평등한가요?\n어시스턴트:"


def test_gbnf_answers_only_its_words(engine):
    g = grammar.from_gbnf(YES_NO)
    answers = set()
    for seed in range(6):
        text, stats = engine.complete(QUESTION, Sampling(temperature=0.8, seed=seed, max_tokens=20, grammar=g))
        assert text in ("예", "아니요") and stats.stop_reason == "eos", (text, stats.stop_reason)
        answers.add(text)
    assert answers == {"예", "아니요"}  # the grammar chose between them, not the model's habit
    # with a grammar the grammar decides where the answer ends, even when end tokens are banned
    text, stats = engine.complete(QUESTION, Sampling(temperature=0, ignore_eos=True, max_tokens=20, grammar=g))
    assert text in ("예", "아니요") and stats.stop_reason == "eos"


def test_gbnf_syntax_error_is_one_line_and_quiet(engine, capfd):
    capfd.readouterr()
    broken = grammar.from_gbnf('root ::= ("예"')
    with pytest.raises(UserError) as caught:
        engine.complete(QUESTION, Sampling(grammar=broken, max_tokens=5))
    message = str(caught.value)
    assert "\n" not in message and "not valid GBNF" in message and "expecting ')'" in message
    assert "root ::=" not in message  # llama.cpp's dump of the grammar is dropped
    with pytest.raises(UserError, match="Undefined rule identifier 'answer'"):
        sampler.check_grammar(engine.vocab, grammar.from_gbnf("root ::= answer"))
    with pytest.raises(UserError, match="'root' symbol"):  # "root" appears, but no rule of that name
        sampler.check_grammar(engine.vocab, grammar.from_gbnf('rooted ::= "예"'))
    assert capfd.readouterr().err == ""
    text, stats = engine.complete(QUESTION, Sampling(temperature=0, max_tokens=20, grammar=grammar.from_gbnf(YES_NO)))
    assert text in ("예", "아니요")  # the engine goes on


@pytest.mark.parametrize("text, words", [('answer ::= "예"', "no root rule"), ("", "empty"), ("  \n ", "empty")])
def test_gbnf_refused_before_llama_cpp(text, words):
    with pytest.raises(UserError, match=words) as caught:
        grammar.from_gbnf(text, "--grammar")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--grammar")


# --- 4. schema answers on the demo --------------------------------------------------------------------------

def test_schema_answers_validate(engine):
    jsonschema.Draft202012Validator.check_schema(PERSON)
    g = grammar.from_schema(PERSON)
    finished = 0
    for seed in range(8):
        text, stats = engine.complete(PROMPT, Sampling(temperature=0.8, seed=seed, max_tokens=200, grammar=g))
        assert "\ufffd" not in text and "\\u" not in text, text
        if stats.stop_reason != "eos":
            assert stats.stop_reason == "length" and is_json_prefix(text), text
            continue
        finished += 1
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        assert f'"{value["기분"]}"' in text and '"이름"' in text  # UTF-8 as written, not \u escapes
    assert finished >= 6


# --- 5. the narrowed retry chooses what masking the whole vocabulary chooses -------------------------------------

class Unnarrowed(sampler.Sampler):
    """A Sampler whose retries mask the whole vocabulary at once."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        for top in self.tops:
            lc.llama_sampler_free(top)
        self.tops = []


@pytest.mark.parametrize("sampling", [Sampling(temperature=0, max_tokens=200),
                                      Sampling(temperature=0.8, top_k=40, seed=11, max_tokens=200)],
                         ids=["greedy", "top-k"])
def test_narrowed_retry_is_exact(engine, monkeypatch, sampling):
    sampling = replace(sampling, grammar=grammar.from_schema(PERSON))
    masked: list[int] = []  # candidates each retry's choice was made among
    choose = sampler.Sampler._choose

    def counted(self):
        masked.append(self._all.size)
        return choose(self)

    monkeypatch.setattr(sampler.Sampler, "_choose", counted)
    narrowed, stats = engine.complete(PROMPT, sampling)
    narrowed_ids = list(engine.generated)
    assert stats.stop_reason == "eos"
    assert any(n < engine.n_vocab for n in masked)  # the narrowed path chose, at least once
    monkeypatch.setattr(sampler, "Sampler", Unnarrowed)
    masked.clear()
    whole, whole_stats = engine.complete(PROMPT, sampling)
    assert masked and all(n == engine.n_vocab for n in masked)
    assert whole == narrowed and list(engine.generated) == narrowed_ids
    assert whole_stats.stop_reason == "eos"


# --- 6. speculation -----------------------------------------------------------------------------------------

def test_speculation_gives_the_same_constrained_text(engine, demo_path):
    schema = {"type": "object", "properties": {"이름": SHORT, "나이": {"type": "integer", "minimum": 0,
                                                                      "maximum": 120}, "도시": SHORT},
              "required": ["이름", "나이", "도시"]}
    example = '{ "이름" : "홍길동", "나이" : 30, "도시" : "서울" }\n'
    prompt = f"{PROMPT} {example}" * 3 + "사용자: 다시 해 주세요.\n어시스턴트:"
    s = Sampling(temperature=0, max_tokens=120, grammar=grammar.from_schema(schema))
    want, want_stats = engine.complete(prompt, s)
    with Engine(one_core(demo_path, draft="lookup")) as spec:
        # drafts whenever it can, as on a GPU: the verification path is what runs
        spec.speculator.length = DraftLength(spec.speculator.draft_max, costs={1: 1.0, 64: 2.26}, draft_cost=0.0)
        text, stats = spec.complete(prompt, s)
    assert text == want and stats.stop_reason == want_stats.stop_reason == "eos"
    jsonschema.validate(json.loads(text), schema)
    assert stats.draft_proposed > 0 and stats.draft_accepted > 0


# --- 7. a cut answer ------------------------------------------------------------------------------------------

def test_cut_answer_is_a_prefix_of_valid_json(engine):
    g = grammar.from_schema(PERSON)
    whole, stats = engine.complete(PROMPT, Sampling(temperature=0, max_tokens=200, grammar=g))
    assert stats.stop_reason == "eos"
    jsonschema.validate(json.loads(whole), PERSON)
    for n in (1, 5, 17, 40):
        text, stats = engine.complete(PROMPT, Sampling(temperature=0, max_tokens=n, grammar=g))
        assert stats.stop_reason == "length" and stats.generated_tokens == n
        assert whole.startswith(text) and is_json_prefix(text), text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


# --- 8. JSON mode -------------------------------------------------------------------------------------------

def test_json_object_mode(engine):
    g = grammar.json_object()
    assert g.is_json and g.schema == {"type": "object"}
    for seed in range(5):
        text, stats = engine.complete(PROMPT, Sampling(temperature=0.8, seed=seed, max_tokens=120, grammar=g))
        assert text.startswith("{") and "\ufffd" not in text, text
        if stats.stop_reason == "eos":
            assert isinstance(json.loads(text), dict)
        else:  # the demo rarely closes a string it started: what it wrote is still a JSON object's beginning
            assert stats.stop_reason == "length" and is_json_prefix(text), text


def test_a_required_name_that_no_property_defines_is_refused():
    """The converter writes only the properties it has, so an answer would leave the required name out and break
    the very schema it was held to."""
    with pytest.raises(UserError, match='required names "나이", which properties does not define'):
        grammar.from_schema({"type": "object", "properties": {"이름": {"type": "string"}},
                             "required": ["이름", "나이"]})


def test_strings_hold_no_surrogates_and_every_hangul_syllable(engine):
    """A byte token at a high temperature could write ED A0 80 (U+D800's bytes), which no UTF-8 decoder accepts:
    the grammar refuses it. Fed byte by byte, 가 (EA B0 80) and 하 (ED 95 98, whose first byte a surrogate shares)
    are taken: a rule that refused ED outright would make half the Hangul syllables unwritable in byte tokens."""
    by_bytes = {engine.model.token_bytes(t, special=False): t for t in range(engine.n_vocab)}
    needed = [bytes([b]) for b in b"\xea\xb0\x80\xed\x95\x98\xa0"] + [b'"']
    if not all(b in by_bytes for b in needed):
        pytest.skip("the vocabulary has no single-byte tokens for these bytes")
    for text, allowed in (("가".encode(), True), ("하".encode(), True), (b"\xed\xa0\x80", False)):
        s = sampler.Sampler(engine.vocab, engine.n_vocab, Sampling(grammar=grammar.from_schema({"type": "string"})))
        try:
            taken = True
            for token in [by_bytes[b'"']] + [by_bytes[bytes([b])] for b in text]:
                if not s._valid(token):
                    taken = False
                    break
                lc_accept(s, token)
            assert taken is allowed, text
        finally:
            s.free()


def lc_accept(s: sampler.Sampler, token: int) -> None:
    lc.llama_sampler_accept(s.grammar, token)


@pytest.mark.parametrize("pattern", ["^a{1,99999999999}$", "^(ab){1001}$", "^x{5000,}$"])
def test_a_pattern_repeating_past_the_bound_is_refused_before_converting(pattern):
    """The converter writes a{m,n} out n times: a{1,99999999999} took all of memory (a MemoryError, or a server's
    RAM) before any size could be checked. Counts are read from the pattern first."""
    with pytest.raises(UserError, match="repeats something more than 1000 times"):
        grammar.from_schema({"type": "string", "pattern": pattern}, "--schema")
    assert grammar.from_schema({"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}).gbnf  # ordinary counts pass


def test_too_many_optional_properties_are_refused_in_words():
    """The converter recurses once per optional property: a thousand ended in 'maximum recursion depth exceeded'."""
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1000)}}
    with pytest.raises(UserError, match="1,000 optional properties; at most 500"):
        grammar.from_schema(many)
    assert grammar.from_schema(many | {"required": list(many["properties"])}).gbnf  # required ones do not recurse
    assert grammar.from_schema({"type": "object", "properties": dict(list(many["properties"].items())[:500])}).gbnf


def test_other_threads_stderr_is_passed_on_while_a_grammar_is_parsed(engine, capfd):
    """The parse catches file descriptor 2 to keep llama.cpp's dump of a bad grammar out: a line another thread
    wrote meanwhile (a server's access log) still reaches stderr, and the dump does not."""
    import os

    from malhae.runtime.sampler import _stderr_captured

    caught: list[str] = []
    with _stderr_captured(caught):
        os.write(2, b"[malhae] 200 | POST /v1/chat/completions\n")
    assert "POST" in caught[0] and capfd.readouterr().err == ""  # caught, as llama.cpp's print would be
    bad = grammar.from_gbnf('root ::= "a" | other-rule-that-is-missing', "--grammar")
    with pytest.raises(UserError, match="--grammar is not valid GBNF"):
        sampler.check_grammar(engine.vocab, bad, "--grammar")
    assert "other-rule-that-is-missing" not in capfd.readouterr().err
    sampler._pass_on("parse: error parsing grammar: x\n\nroot ::= y\nthe access log line\n", "root ::= y")
    assert capfd.readouterr().err == "the access log line\n"


# --- number bounds: whole-number bounds on decimals, checked against exact arithmetic ---------------------------

NUMBER_BOUNDS = [
    {"minimum": 0, "maximum": 1},
    {"minimum": 1, "maximum": 5},
    {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"minimum": -1, "maximum": 1},
    {"minimum": -10, "exclusiveMaximum": -2},
    {"exclusiveMinimum": -3, "maximum": 0},
    {"minimum": 0},
    {"exclusiveMinimum": 0},
    {"maximum": 100},
    {"exclusiveMaximum": 0},
    {"minimum": 7, "maximum": 7},
    {"minimum": 2, "exclusiveMinimum": 2, "maximum": 9, "exclusiveMaximum": 9},
]


def texts_near(edges) -> set[str]:
    """Decimal strings around each edge: whole, with zero fractions, just above and below, far off, and malformed."""
    out = {"0", "-0", "0.0", "-0.0", "00", "01", "1.", ".5", "+1", "1e3", "-", "", "0.00000000000001"}
    for e in edges:
        for n in range(int(e) - 3, int(e) + 4):
            for frac in ("", ".0", ".000", ".5", ".05", ".999", ".0001", ".9999999"):
                out |= {f"{n}{frac}", f"-{abs(n)}{frac}"}
    return out


@pytest.mark.parametrize("bounds", NUMBER_BOUNDS, ids=[json.dumps(b) for b in NUMBER_BOUNDS])
def test_number_bounds_are_exact(engine, bounds):
    from decimal import Decimal, InvalidOperation

    g = grammar.from_schema({"type": "number", **bounds})
    sampler.check_grammar(engine.vocab, g)
    pattern = gbnf_regex(rules(g.gbnf)["root"].removesuffix(" space"), r'"-?[0-9.]*"', "()|?*+")

    def allowed(text: str) -> bool:  # a plain JSON number (no exponent, no leading zeros, no "-0") inside the bounds
        if not re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", text) or re.fullmatch(r"-0(\.0*)?", text):
            return False
        try:
            v = Decimal(text)
        except InvalidOperation:
            return False
        return (v >= bounds.get("minimum", -10**20) and v > bounds.get("exclusiveMinimum", -10**20)
                and v <= bounds.get("maximum", 10**20) and v < bounds.get("exclusiveMaximum", 10**20))

    wrong = [t for t in sorted(texts_near([0, *bounds.values()])) if bool(pattern.fullmatch(t)) != allowed(t)]
    assert not wrong, wrong[:10]


def test_number_bounds_must_be_whole_and_leave_room():
    with pytest.raises(UserError, match="minimum 0.5 on a number: .* whole numbers only"):
        grammar.from_schema({"type": "number", "minimum": 0.5})
    with pytest.raises(UserError, match="no number lies between 3 and 3"):
        grammar.from_schema({"type": "number", "exclusiveMinimum": 3, "maximum": 3})


def test_pydantic_float_fields_with_bounds_validate(engine):
    """pydantic's Field(ge=0, le=1) on a float (a confidence, a share) is what such users write."""
    pydantic = pytest.importorskip("pydantic")

    class 판정(pydantic.BaseModel):
        확신: float = pydantic.Field(ge=0, le=1)
        점수: float = pydantic.Field(gt=-5, lt=5)

    g = grammar.from_schema(판정.model_json_schema(), "response_format")
    for seed in range(4):
        text, stats = engine.complete("판정(JSON):", Sampling(temperature=1.0, seed=seed, max_tokens=80, grammar=g))
        assert stats.stop_reason == "eos", text
        판정.model_validate_json(text)


def test_a_list_of_types_keeps_the_schemas_other_keywords(engine):
    """The port turns "type": ["string", "null"] into a union of bare types and drops the rest: maxLength 3 let any
    string through, an enum any value of those types. Each type now keeps them (jsonschema judges)."""
    schemas = [{"type": ["string", "null"], "maxLength": 3},
               {"type": ["integer", "null"], "minimum": 1, "maximum": 3},
               {"type": ["string", "null"], "enum": ["가", None]}]
    for schema in schemas:
        g = grammar.from_schema(schema)
        for seed in range(4):
            text, stats = engine.complete("값:", Sampling(temperature=1.5, seed=seed, max_tokens=30, grammar=g))
            assert stats.stop_reason == "eos", (schema, text)
            jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(("schema", "words"), [
    ({"anyOf": [{"type": "string"}], "maxLength": 3}, "maxLength beside anyOf would be ignored"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}, "enum": ["x"]}, "enum beside $ref"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "maxLength beside a pattern"),
    ({"type": "string", "format": "date-time", "minLength": 30}, "minLength beside a format"),
    ({"type": "object", "required": ["이름"]}, 'required names "이름"'),
])
def test_what_the_converter_would_drop_is_refused(schema, words):
    """The port reads one branch of a schema and drops what stands beside it: the answer would break the schema."""
    with pytest.raises(UserError, match=re.escape(words)):
        grammar.from_schema(schema)


def test_a_rich_pydantic_model_converts():
    """What pydantic writes for ordinary fields (nested and optional models, enums, Literal, dates, bounded ints and
    floats, lists, dicts) passes every check above: annotations (title, default) beside $ref and anyOf are fine."""
    import datetime
    import enum
    from typing import Literal

    pydantic = pytest.importorskip("pydantic")

    class 색(str, enum.Enum):
        빨강 = "빨강"
        파랑 = "파랑"

    class 주소(pydantic.BaseModel):
        도시: str = pydantic.Field(max_length=10)
        우편번호: str | None = None

    class 사람(pydantic.BaseModel):
        이름: str
        나이: int = pydantic.Field(ge=0, le=150)
        키: float = pydantic.Field(gt=0, lt=300)
        좋아하는색: 색 = 색.빨강
        성별: Literal["남", "여"]
        생일: datetime.date
        주소: 주소
        이전주소: 주소 | None = None
        별명: list[str] = pydantic.Field(default_factory=list, max_length=3)
        점수: dict[str, int] = {}

    assert "root ::=" in grammar.from_schema(사람.model_json_schema()).gbnf
