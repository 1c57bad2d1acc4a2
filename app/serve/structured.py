"""Reading what a request asks its answer to follow: OpenAI's `response_format`, llama-server's `json_schema` and
`grammar`, Ollama's `format`. Each becomes one app.runtime.grammar.Grammar (or none), checked before the request is
queued, so a schema or grammar the model cannot follow is a 400 naming the field, never a failed generation."""

from __future__ import annotations

import asyncio

from malhae.errors import UserError
from malhae.runtime import grammar as grammars
from malhae.runtime import sampler
from malhae.runtime.grammar import Grammar
from malhae.serve.errors import ApiError
from malhae.serve.fields import Body

FIELDS = ("response_format", "json_schema", "grammar")  # the ones OpenAI's and llama-server's endpoints take


def _invalid(e: UserError, param: str) -> ApiError:
    return ApiError(str(e), param=param, code="invalid_schema")


def openai(body: Body) -> Grammar | None:
    """The grammar of an OpenAI-style request: response_format (text, json_object — with llama-server's optional
    `schema` — or json_schema), or llama-server's json_schema or grammar; at most one of them."""
    given = [name for name in FIELDS if body.data.get(name) is not None]
    if len(given) > 1:
        raise ApiError(f"{given[0]} and {given[1]} both constrain the answer; send one", param=given[1],
                       code="invalid_value")
    if not given:
        return None
    name = given[0]
    try:
        if name == "grammar":
            return grammars.from_gbnf(body.get("grammar", (str,)), "grammar")
        if name == "json_schema":
            return grammars.from_schema(body.get("json_schema", (dict,)), "json_schema")
        return _response_format(body.get("response_format", (dict,)))
    except UserError as e:
        raise _invalid(e, name) from None


def _response_format(value: dict) -> Grammar | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")  # llama-server's extension: json_object with a schema
        return grammars.json_object() if schema is None else grammars.from_schema(schema, "response_format.schema")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise UserError("response_format.json_schema must be an object with `name` and `schema`")
        schema = spec.get("schema")
        return grammars.json_object() if schema is None else \
            grammars.from_schema(schema, "response_format.json_schema.schema")
    raise UserError(f"response_format.type must be text, json_object or json_schema, not {str(kind)[:40]!r}")


def ollama(body: Body) -> Grammar | None:
    """Ollama's `format`: "json" (any JSON object), a JSON schema, or "" / absent (none)."""
    value = body.data.get("format")
    if value is None or value == "":
        return None
    if value == "json":
        return grammars.json_object()
    if not isinstance(value, dict):
        raise ApiError('format must be "json" or a JSON schema object', param="format", code="invalid_value")
    try:
        return grammars.from_schema(value, "format")
    except UserError as e:
        raise _invalid(e, "format") from None


async def checked(svc, g: Grammar | None, param: str) -> Grammar | None:
    """`g` once llama.cpp has parsed it with the served model's vocabulary (a GBNF syntax error is a 400 with
    llama.cpp's reason); in a thread, as tokenizing is. A schema's grammar is valid by construction and is not
    parsed twice: each job's sampler parses it anyway (and a failure there fails that job alone)."""
    if g is not None and g.schema is None:
        try:
            await asyncio.to_thread(sampler.check_grammar, svc.engine.model.vocab, g, param)
        except UserError as e:
            raise _invalid(e, param) from None
    return g
