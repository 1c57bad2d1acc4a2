"""Constrained decoding's input: a JSON schema or a GBNF grammar, checked and turned into what llama.cpp's grammar
sampler reads.

JSON Schema → GBNF is llama-cpp-python's port of llama.cpp's json-schema-to-grammar (`llama_cpp.llama_grammar`), not
a converter of malhae's own. The port lags llama.cpp's in three places this module mends on top of it, each in one
override: integers with bounds (`minimum`/`maximum`, which the port ignores: a schema asking for 1-5 got 12345), raw
control characters inside strings (the port lets a newline into a JSON string, which no JSON parser accepts) and
JSON string literals holding a quote or a backslash (the port writes them unescaped). Everything else the port does
not implement is refused by name before any model is loaded (`unsupported`), never ignored: an answer that looks
valid and breaks the schema is worse than a clear "no".

Schemas come from users and from HTTP clients, so every number in them that grows the grammar (repetitions, string
lengths, integer digits, nesting, size) is bounded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from malhae.errors import UserError
from malhae.runtime import ranges

MAX_SCHEMA_BYTES = 256 << 10  # a 50-property schema is about 5 KB
MAX_GRAMMAR_BYTES = 1 << 20  # GBNF, given or made from a schema
MAX_DEPTH = 32  # nesting of a schema's objects, arrays and combinators
MAX_REPEAT = 1000  # minItems / maxItems / minLength / maxLength: each is written out in the grammar
MAX_OPTIONAL = 500  # optional properties of one object: the converter recurses once per one (1,000 hit Python's limit)
MAX_INT_DIGITS = 15  # the port's integers have at most 16 digits; bounds stay within them

# keywords the converter implements, and those that only describe (they change no valid output)
CONVERTED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "oneOf", "anyOf", "allOf", "$ref", "$defs", "definitions", "pattern",
             "format", "minLength", "maxLength"}
# mended here: any bounds on an integer, whole-number bounds on a number (app.runtime.ranges)
NUMBER_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly",
               "deprecated", "contentMediaType", "contentEncoding"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


@dataclass(frozen=True)
class Grammar:
    """What constrains an answer: GBNF for llama.cpp, and the JSON schema it was made from, if any (a remote server
    is sent the schema, not malhae's GBNF). `what` names its kind in messages, `source` where it came from (the
    flag or field: "--grammar", "format")."""

    gbnf: str
    what: str
    schema: dict | None = field(default=None, compare=False)
    source: str = field(default="the grammar", compare=False)

    @property
    def is_json(self) -> bool:
        return self.schema is not None


def json_object() -> Grammar:
    """Any JSON object: OpenAI's `json_object` mode and Ollama's `format: "json"`."""
    return from_schema({"type": "object"}, "JSON mode")


def from_schema(schema: object, where: str = "the schema") -> Grammar:
    """A checked JSON schema's grammar; a schema that is not one, uses what is not implemented, or has no finite
    answer is a one-line UserError that says so."""
    if not isinstance(schema, dict):
        raise UserError(f"{where} must be a JSON object (a JSON schema), not {type(schema).__name__}")
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise UserError(f"{where} is {size:,} bytes; at most {MAX_SCHEMA_BYTES:,}")
    found: set[str] = set()
    _walk(schema, where, 0, found)
    if found:
        names = ", ".join(sorted(found))
        raise UserError(f"{where} uses {names}, which constrained decoding does not implement; remove "
                        f"{'it' if len(found) == 1 else 'them'} (and check the answer in your program)")
    try:
        finite = _finite(schema, schema, frozenset())
        gbnf = _converter().convert(schema) if finite else ""
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{where} cannot be turned into a grammar: {str(e)[:200]}") from None
    if not finite:
        raise UserError(f"{where} is recursive without a way out: every answer would be infinitely deep (make the "
                        "recursive property optional, or give it minItems 0)")
    return _bounded(Grammar(gbnf, "JSON schema", schema, where), where)


def from_gbnf(text: str, where: str = "the grammar") -> Grammar:
    """A GBNF grammar as given (its syntax is llama.cpp's to judge: `check`)."""
    if not text.strip():
        raise UserError(f"{where} is empty; give GBNF rules, e.g. root ::= (\"예\" | \"아니요\")")
    if "root" not in text:
        raise UserError(f"{where} has no root rule; GBNF starts from `root ::= …`")
    return _bounded(Grammar(text, "GBNF grammar", source=where), where)


def _bounded(g: Grammar, where: str) -> Grammar:
    size = len(g.gbnf.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise UserError(f"{where} makes a grammar of {size:,} bytes; at most {MAX_GRAMMAR_BYTES:,} (fewer or "
                        "shorter repetitions)")
    return g


# --- checking a schema -----------------------------------------------------------------------------------------

_COUNTS = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")  # a pattern's {m}, {m,}, {m,n}


def _walk(node: object, where: str, depth: int, found: set[str]) -> None:
    """Every keyword of every subschema is one the converter implements or one that only describes; the others
    go into `found`. Counts and depths are bounded here, before the converter writes anything out."""
    if depth > MAX_DEPTH:
        raise UserError(f"{where} is nested more than {MAX_DEPTH} deep")
    if isinstance(node, bool):  # the port reads neither: `true` crashed it
        found.add(f"a `{str(node).lower()}` schema")
        return
    if not isinstance(node, dict):
        raise UserError(f"{where}: a subschema must be an object, not {json.dumps(node, ensure_ascii=False)[:60]}")
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if not kinds or any(k is not None and k not in TYPES for k in kinds):
        raise UserError(f"{where}: unknown type {json.dumps(kind, ensure_ascii=False)[:60]}; the types are "
                        f"{', '.join(TYPES)}")
    for key, value in node.items():
        if key in NUMBER_BOUNDS and {"integer", "number"} & set(kinds) and set(kinds) <= {"integer", "number", "null"}:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) >= 10 ** MAX_INT_DIGITS:
                raise UserError(f"{where}: {key} must be a number of at most {MAX_INT_DIGITS} digits")
            if "number" in kinds and not float(value).is_integer():
                raise UserError(f"{where}: {key} {value} on a number: constrained decoding bounds numbers by whole "
                                "numbers only (0, 1, 100)")
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
                raise UserError(f"{where}: {key} must be a whole number from 0 to {MAX_REPEAT}")
        elif key in ("pattern", "format") and not isinstance(value, str):
            raise UserError(f"{where}: {key} must be a string")
        elif key == "pattern" and any(n and (len(n) > 4 or int(n) > MAX_REPEAT)
                                      for counts in _COUNTS.findall(value) for n in counts):
            # the converter writes a{m,n} out n times: a{1,99999999999} took all memory before any size check
            raise UserError(f"{where}: pattern repeats something more than {MAX_REPEAT} times ({value[:60]!r})")
        elif key not in CONVERTED and key not in ANNOTATIONS:
            found.add(f"{key} (on {kind})" if key in NUMBER_BOUNDS and kind else key)
    properties = node.get("properties")
    if isinstance(properties, dict) and isinstance(node.get("required", []), list):
        optional = len(set(properties) - set(node.get("required", [])))
        if optional > MAX_OPTIONAL:
            raise UserError(f"{where}: an object with {optional:,} optional properties; at most {MAX_OPTIONAL} (make "
                            "some required, or split the object)")
    for key in ("properties", "$defs", "definitions"):
        children = node.get(key, {})
        if not isinstance(children, dict):
            raise UserError(f"{where}: {key} must be an object")
        for name, child in children.items():
            if key == "properties" and ('"' in name or "\\" in name or any(ord(c) < 32 for c in name)):
                raise UserError(f"{where}: property name {json.dumps(name, ensure_ascii=False)[:60]} holds a quote, "
                                "backslash or control character; constrained decoding cannot write it")
            _walk(child, where, depth + 1, found)
    for key in ("oneOf", "anyOf", "allOf", "prefixItems"):
        if key not in node:
            continue
        children = node[key]
        if not isinstance(children, list) or not children:
            raise UserError(f"{where}: {key} must be a non-empty array of schemas")
        for child in children:
            _walk(child, where, depth + 1, found)
    for key in ("items", "additionalProperties"):
        child = node.get(key, False)  # false: no more items or properties; additionalProperties true: any
        if child is not False and not (key == "additionalProperties" and child is True):
            for c in child if isinstance(child, list) and key == "items" else [child]:
                _walk(c, where, depth + 1, found)
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if node.get(low, 0) > node.get(high, MAX_REPEAT):
            raise UserError(f"{where}: {low} {node[low]} is more than {high} {node[high]}; nothing fits both")
    if "required" in node and (not isinstance(node["required"], list)
                               or not all(isinstance(r, str) for r in node["required"])):
        raise UserError(f"{where}: required must be an array of property names")
    undefined = [r for r in node.get("required", []) if r not in node.get("properties", {})]
    if undefined and "allOf" not in node:  # the converter would leave it out, and every answer break the schema
        raise UserError(f"{where}: required names {json.dumps(undefined[0], ensure_ascii=False)[:60]}, which "
                        "properties does not define; define it or drop it from required")
    _nothing_dropped(node, where)
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise UserError(f"{where}: enum must be a non-empty array")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise UserError(f"{where}: $ref {json.dumps(ref)[:80]} is not supported; only references inside the schema "
                        "(#/$defs/…) are")


def _nothing_dropped(node: dict, where: str) -> None:
    """The converter reads one branch of a schema: beside $ref, anyOf or oneOf it reads nothing else, and a string
    with a pattern or a format loses its length bounds. A keyword it would drop so is refused, not ignored."""
    for first in ("$ref", "anyOf", "oneOf"):
        if first in node:
            dropped = sorted(k for k in node if k in CONVERTED | NUMBER_BOUNDS and k != first
                             and k not in ("type", "$defs", "definitions", "anyOf", "oneOf"))
            if dropped:
                raise UserError(f"{where}: {', '.join(dropped)} beside {first} would be ignored; move "
                                f"{'it' if len(dropped) == 1 else 'them'} into the {first} branches")
    lengths = sorted({"minLength", "maxLength"} & set(node))
    if lengths and ("pattern" in node or node.get("format") in ("date", "time", "date-time", "uuid")):
        raise UserError(f"{where}: {' and '.join(lengths)} beside a {'pattern' if 'pattern' in node else 'format'} "
                        "would be ignored; put the length into the pattern ({m,n})")


def _target(root: dict, ref: str) -> object:
    node: object = root
    for part in ref.split("#", 1)[1].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"$ref {ref[:80]} points at nothing")  # from_schema says where
        node = node[part]
    return node


def _finite(node: object, root: dict, seen: frozenset[str]) -> bool:
    """Whether some finite JSON value satisfies `node` as the converter reads it: a $ref cycle whose every way
    round is required (an object that must contain itself) has none, and would generate until max_tokens."""
    if not isinstance(node, dict):
        return node is not False
    ref = node.get("$ref")
    if isinstance(ref, str):
        return ref not in seen and _finite(_target(root, ref), root, seen | {ref})
    for key in ("oneOf", "anyOf"):
        if key in node:
            return any(_finite(c, root, seen) for c in node[key])
    if "allOf" in node and not all(_finite(c, root, seen) for c in node["allOf"]):
        return False
    if "enum" in node or "const" in node:
        return True
    props = node.get("properties", {})
    if not all(_finite(props[name], root, seen) for name in node.get("required", []) if name in props):
        return False
    items = node.get("items")
    if isinstance(items, dict) and node.get("minItems", 0) > 0 and not _finite(items, root, seen):
        return False
    return all(_finite(c, root, seen) for c in node.get("prefixItems", []))


# --- the converter, mended -------------------------------------------------------------------------------------

def _literal(text: str) -> str:
    """A GBNF literal for exactly `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _converter():
    from llama_cpp import llama_grammar as port

    class Converter(port.SchemaConverter):
        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._ref_names: dict[str, str] = {}

        def convert(self, schema: dict) -> str:
            schema = json.loads(json.dumps(schema))  # a copy: the port's visit is free to change what it reads
            self._find_refs(schema, schema)
            self.visit(schema, "")
            return self.format_grammar()

        def _find_refs(self, node, root: dict) -> None:
            """Every $ref's target, by _target (all are local: _walk). The port's resolve_refs knew no "#" (the
            whole schema) and skipped what lies beside a $ref: a root `{"$ref": …, "$defs": …}`, as pydantic
            writes a recursive model, was a KeyError."""
            if isinstance(node, list):
                for child in node:
                    self._find_refs(child, root)
            elif isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and ref.startswith("#") and ref not in self._refs:
                    self._refs[ref] = _target(root, ref)
                for child in node.values():
                    self._find_refs(child, root)

        def _resolve_ref(self, ref):
            """A $ref's rule, named once, before its target is visited, so that a recursive $ref names the same
            rule. The port used the ref's last part as it stood (a Korean $defs name, or "#", is no rule name to
            llama.cpp) and named recursive refs so even when the rule had been given another name."""
            name = self._ref_names.get(ref)
            if name is None:
                base = port.INVALID_RULE_CHARS_RE.sub("-", ref.split("/")[-1]).strip("-") or "ref"
                taken = {*self._rules, *self._ref_names.values(), *port.RESERVED_NAMES}
                name = base if base not in taken else next(f"{base}{i}" for i in range(len(taken) + 1)
                                                           if f"{base}{i}" not in taken)
                self._ref_names[ref] = name
                made = self.visit(self._refs[ref], name)
                if made != name:  # a primitive's shared rule, e.g. `string`
                    self._rules[name] = made
            return name

        def visit(self, schema, name):
            kinds = schema.get("type")
            if isinstance(kinds, list) and not {"$ref", "oneOf", "anyOf"} & set(schema):
                # the port makes a list of types a union of bare types, dropping the schema's other keywords
                # (["string", "null"] with maxLength 3 allowed any string): each type keeps them
                rule_name = name + "-" if name in port.RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, self._generate_union_rule(name, [schema | {"type": k} for k in kinds]))
            if kinds == "number" and NUMBER_BOUNDS & set(schema):
                lows = [(int(schema[k]), k == "exclusiveMinimum") for k in ("minimum", "exclusiveMinimum")
                        if k in schema]
                highs = [(int(schema[k]), k == "exclusiveMaximum") for k in ("maximum", "exclusiveMaximum")
                         if k in schema]
                lo, lo_open = max(lows) if lows else (None, False)  # the stricter of each pair
                hi, hi_open = min(highs, key=lambda b: (b[0], not b[1])) if highs else (None, False)
                rule_name = name + "-" if name in port.RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, ranges.decimals(lo, lo_open, hi, hi_open) + " space")
            if kinds == "integer" and NUMBER_BOUNDS & set(schema):
                lo, hi = schema.get("minimum"), schema.get("maximum")
                if "exclusiveMinimum" in schema:
                    lo = max(math.floor(schema["exclusiveMinimum"]) + 1, -math.inf if lo is None else math.ceil(lo))
                if "exclusiveMaximum" in schema:
                    hi = min(math.ceil(schema["exclusiveMaximum"]) - 1, math.inf if hi is None else math.floor(hi))
                lo = None if lo is None else int(math.ceil(lo))
                hi = None if hi is None else int(math.floor(hi))
                if lo is not None and hi is not None and lo > hi:
                    raise ValueError(f"no integer lies between {lo} and {hi}")
                rule_name = name + "-" if name in port.RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, ranges.integers(lo, hi) + " space")
            return super().visit(schema, name)

        def _generate_constant_rule(self, value):
            return _literal(json.dumps(value, ensure_ascii=False))

        def _add_primitive(self, name, rule):
            # JSON strings hold no raw control characters (U+0000-U+001F), and UTF-8 holds no surrogates (a byte
            # token sampled at a high temperature could write ED A0 80, which no decoder accepts). Positive ranges,
            # not [^…]: llama.cpp refuses a partial character (one byte of three) whose possible values touch an
            # excluded range, and ED begins U+D000-U+D7FF too — 하, 한, 해 written byte by byte
            if name == "char":
                rule = port.BuiltinRule(r'[\x20-\x21\x23-\x5B\x5D-\x7E\x80-\uD7FF\uE000-\U0010FFFF] | "\\" '
                                        r'(["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', [])
            return super()._add_primitive(name, rule)

    return Converter()


# --- what users type -------------------------------------------------------------------------------------------

CONCISE_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def concise(text: str, where: str = "--schema") -> dict:
    """simonw/llm's concise schema syntax as a JSON schema: fields separated by commas (or by newlines, when there are
    any), each `name [type][: description]` with type str (the default), int, float or bool; every field required.
    `name, age int, 요약: 한 문장 요약` is an object of a string, an integer and a described string."""
    separator = "\n" if "\n" in text.strip() else ","
    properties: dict[str, dict] = {}
    for raw in text.split(separator):
        item, _, description = raw.partition(":")
        words = item.split()
        if not words and not description.strip():
            continue
        if len(words) not in (1, 2) or len(words) == 2 and words[1] not in CONCISE_TYPES:
            raise UserError(f"{where}: {raw.strip()[:60]!r} is not `name [type][: description]` (types: "
                            f"{', '.join(CONCISE_TYPES)}), e.g. --schema 'name, age int, 요약: 한 문장 요약'")
        name = words[0]
        if name in properties:
            raise UserError(f"{where}: the field {name!r} is given twice")
        field_schema = {"type": CONCISE_TYPES[words[1] if len(words) == 2 else "str"]}
        if description.strip():
            field_schema["description"] = description.strip()
        properties[name] = field_schema
    if not properties:
        raise UserError(f"{where} is empty; give a JSON schema, a .json file or fields, e.g. --schema 'name, age int'")
    return {"type": "object", "properties": properties, "required": list(properties)}


def from_argument(schema: str | None = None, gbnf: str | None = None) -> Grammar | None:
    """--schema (inline JSON, a JSON file, or the concise syntax) or --grammar (a GBNF file, or rules inline): the
    Grammar, None without either; both at once is a UserError."""
    from pathlib import Path

    from malhae import files

    if schema is not None and gbnf is not None:
        raise UserError("--schema and --grammar both constrain the answer; give one of them")
    if gbnf is not None:
        if "::=" in gbnf:
            return from_gbnf(gbnf, "--grammar")
        path = Path(gbnf)
        fix = "give a GBNF file or rules inline, e.g. --grammar 'root ::= (\"예\" | \"아니요\")'"
        text = files.read_user_text(path, "grammar file", limit=MAX_GRAMMAR_BYTES, fix=fix)
        return from_gbnf(text, f"--grammar {path}")
    if schema is None:
        return None
    text = schema.strip()
    if text.startswith(("{", "[")):
        return from_schema(files.parse_json(text, "--schema", "give a JSON schema object"), "--schema")
    path = Path(text) if text and "\n" not in text and len(text) < 4096 else None
    if path is not None and (path.suffix == ".json" or path.exists()):
        data = files.read_user_bytes(path, "schema file", limit=MAX_SCHEMA_BYTES, fix="give a JSON schema file")
        return from_schema(files.parse_json(data, f"schema file {path}"), f"schema file {path}")
    return from_schema(concise(text), "--schema")
