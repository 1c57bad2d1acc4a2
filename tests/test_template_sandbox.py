"""A chat template from outside — a GGUF's tokenizer.chat_template (`gguf-new-metadata --chat-template …`), a server's
template — is code malhae did not write: whatever it does when rendered (divides by zero, adds text to a number, asks
for 100 GB, loops 10^10 times) is one line naming where the template came from and the way around it (--template),
fast, with nothing left running; and the templates real models ship still render as before."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from malhae.convert.rewrite import copy_gguf
from malhae.errors import UserError
from malhae.runtime import sandbox, templates
from malhae.store import models

ROOT = Path(__file__).resolve().parent.parent
TURNS = [("user", "안녕하세요"), ("assistant", "네, 안녕하세요."), ("user", "헌법 제1조는?")]
FIX = "--template base|koalpaca|kullm"

BROKEN = {
    "division by zero": ("{{ 1/0 }}", "ZeroDivisionError"),
    "text plus a number": ("{% for m in messages %}{{ m.content + 5 }}{% endfor %}", "TypeError"),
    "100 GB of x": ("{{ 'x'*100000000000 }}", "over the limit"),
    "10^10 loop iterations": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "doubling with ~": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "with ~"),
    "doubling with +": (
        "{% set ns = namespace(s=['a']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "with +"),
    "a huge width": ("{{ 'x'|center(100000000000) }}{{ 'x'.ljust(100000000000) }}", "width or count"),
    "a huge printf width": ("{{ '%99999999999d' % 1 }}", "width over the limit"),
    "a tower of powers": ("{{ 10**1000000 }}", "bits"),
    "replace that multiplies": ("{{ ('x' * 4000000)|replace('x', 'yyyy') }}", "with replace"),
    "endless recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "output without end": ("{% for i in range(100000) %}{{ range(100000)|join }}{% endfor %}", "prompt of more"),
    "work without output": ("{% for i in range(100000) %}{% set s = range(100000)|join %}{% endfor %}", "steps"),
    "its own refusal": ("{{ raise_exception('no system role') }}", "no system role"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_or_hostile_template_is_one_line_naming_its_source(case):
    source, says = BROKEN[case]
    started = time.monotonic()
    with pytest.raises(UserError) as e:
        templates.for_source("m", source).prompt(TURNS)
    took = time.monotonic() - started
    message = str(e.value)
    assert message.startswith("the model's chat template (tokenizer.chat_template in the GGUF) failed: "), message
    assert says in message and FIX in message and "\n" not in message
    assert took < sandbox.MAX_SECONDS, f"{case} took {took:.1f} s"


def test_the_bounds_leave_real_templates_alone():
    """Loops over a long chat, filters, tests, loop variables, namespace, format, `~`, `*` and recursion: rendered as
    transformers renders them (its own Jinja environment, without malhae's bounds)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    source = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages if m.role != 'system' %}"
              "{% set ns.n = ns.n + 1 %}{{ '%s-%03d' % (m.role, loop.index) }}: {{ m.content|trim ~ '' }}"
              "{% if not loop.last %}{{ '\n' * 2 }}{% endif %}{% endfor %}{{ '|{}|'.format(ns.n) }}"
              "{{ range(3)|join(',') }}{{ range(4)|length }}{{ messages|map(attribute='role')|unique|list|length }}"
              "{% for i in range(3) recursive %}{{ i }}{% if i %}{{ loop(range(i)) }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}\nassistant:{% endif %}")
    turns = [("user" if i % 2 == 0 else "assistant", f"말 {i}") for i in range(4001)]
    started = time.monotonic()
    prompt = templates.for_source("m", source, bos_token="<s>").prompt(turns)
    assert time.monotonic() - started < 1
    messages = [{"role": role, "content": text} for role, text in turns]
    assert prompt == _compile_jinja_template(source).render(messages=messages, add_generation_prompt=True,
                                                            bos_token="<s>", eos_token="")
    assert prompt.startswith("<s>user-001: 말 0\n\nassistant-002: 말 1\n\n") and "user-4001: 말 4000|4001|" in prompt


def test_a_hostile_template_does_not_stop_at_compiling():
    """Jinja folds constant expressions while compiling: 'x'*100000000000 asked for the 100 GB right there."""
    for source in ("{{ 'x' * 100000000000 }}", "{{ 'x'|center(100000000000) }}", "{{ 2 ** 100000000 }}"):
        tpl = templates.for_source("m", source)  # compiles at once
        with pytest.raises(UserError, match="failed: it "):
            tpl.prompt(TURNS)


def with_chat_template(dst: Path, source: str) -> Path:
    demo = models.demo_model()
    assert demo is not None
    return copy_gguf(demo, dst, fields={gguf.Keys.Tokenizer.CHAT_TEMPLATE: None},
                     extra=lambda writer: writer.add_chat_template(source))


def malhae(*args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALHAE_ENDPOINT", "MALHAE_API_KEY")}
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120,
                          env=clean)


def test_ask_with_a_gguf_whose_template_divides_by_zero_is_one_line(tmp_path):
    from helpers import one_error_line

    path = with_chat_template(tmp_path / "broken.gguf", "{{ 1/0 }}")
    line = one_error_line(malhae("ask", "안녕", "-m", str(path), "-n", "1"))
    assert "tokenizer.chat_template in the GGUF" in line and "ZeroDivisionError" in line and FIX in line
    proc = malhae("ask", "안녕", "-m", str(path), "-n", "1", "--template", "base")  # the way around it works
    assert proc.returncode == 0, proc.stderr.decode()


def test_a_servers_template_is_named_as_the_servers(tmp_path):
    pytest.importorskip("uvicorn")
    from helpers import one_error_line, serving

    path = with_chat_template(tmp_path / "served.gguf", "{% for m in messages %}{{ m.content + 5 }}{% endfor %}")
    with serving(path, parallel=1, n_ctx=256) as server:
        line = one_error_line(malhae("ask", "안녕", "--endpoint", server.url + "/v1", "-n", "1"))
    assert "the server's chat template" in line and server.url in line and "TypeError" in line and FIX in line
