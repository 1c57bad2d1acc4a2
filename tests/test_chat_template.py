"""Chat templates inside the GGUF: the Jinja in models/templates.toml frames prompts exactly like malhae's own
Template.prompt, as rendered by transformers and by llama-cpp-python from a converted file's metadata; the converter
writes it; malhae reads it back (flag > GGUF > name)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from malhae.convert import pipeline
from malhae.convert.rewrite import copy_gguf
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.engine import Engine
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions, Sampling

ROOT = Path(__file__).resolve().parent.parent
DEMO_HF = ROOT / "models" / "demo" / "hf"
NAMES = ["base", "koalpaca", "kullm"]

SYSTEMS = {"default": None, "own": "너는 헌법을 잘 아는 조수야.\n짧게 답해.", "empty": ""}
CONVERSATIONS = {
    "none": [],
    "one": [("user", "대한민국의 수도는 어디인가요?")],
    "three": [("user", "헌법 제1조를 알려 주세요."),
              ("assistant", "제1조 ① 대한민국은 민주공화국이다.\n② 대한민국의 주권은 국민에게 있고…"),
              ("user", "두 줄로:\n- 요약해 주세요\n- {message} 와 {{ 괄호 }} 는 그대로, '따옴표'도 \"그대로\"")],
    "spaces": [("user", "  앞뒤 공백  \n\n"), ("assistant", " 네 "), ("user", "### 질문: 끼어든 머리말")],
}
CASES = [(t, c, s) for t in NAMES for c in CONVERSATIONS for s in SYSTEMS]


def messages(turns, system):
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": role, "content": text} for role, text in turns]


def expected(name, turns, system):
    """What malhae puts before an answer; an empty system message means no system line, as /system "" does."""
    return templates.get(name).prompt(list(turns), system)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_HF)


@pytest.mark.parametrize(("name", "conv", "system"), CASES)
def test_transformers_renders_the_same_prompt(hf_tokenizer, name, conv, system):
    turns, sys_text = CONVERSATIONS[conv], SYSTEMS[system]
    source = templates.get(name).chat_template
    msgs = messages(turns, sys_text)
    if msgs:
        rendered = hf_tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                                    add_generation_prompt=True)
    else:  # apply_chat_template refuses an empty chat; its own Jinja environment renders one
        from transformers.utils.chat_template_utils import _compile_jinja_template

        rendered = _compile_jinja_template(source).render(messages=[], add_generation_prompt=True)
    assert rendered == expected(name, turns, sys_text)


def test_without_generation_prompt_the_jinja_is_the_history_only(hf_tokenizer):
    turns = CONVERSATIONS["three"][:2]
    for name in NAMES:
        t = templates.get(name)
        rendered = hf_tokenizer.apply_chat_template(messages(turns, None), chat_template=t.chat_template,
                                                    tokenize=False, add_generation_prompt=False)
        assert rendered + t.assistant == t.prompt(turns)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The demo checkpoint converted once per way a template gets chosen: forced, from the name, or not at all."""
    root = tmp_path_factory.mktemp("tpl")
    out = {name: pipeline.convert(DEMO_HF, "f16", root / f"{name}.gguf", template=name) for name in NAMES}
    out["by-name"] = pipeline.convert(DEMO_HF, "f16", root / "kullm-name.gguf", name="kullm-polyglot-5.8b-v2")
    out["unknown"] = pipeline.convert(DEMO_HF, "f16", root / "unknown.gguf")
    return out


def test_the_converter_writes_the_jinja_gguf_readers_see(converted):
    for name in NAMES:
        result = converted[name]
        assert result.template == name
        field = gguf.GGUFReader(result.path).fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE]
        assert bytes(field.parts[-1]).decode("utf-8") == templates.get(name).chat_template
    assert converted["by-name"].template == "kullm"
    assert read_info(converted["by-name"].path).metadata["tokenizer.chat_template"] == \
        templates.get("kullm").chat_template
    assert converted["unknown"].template is None  # "hf" (the folder) names no known format: nothing is written
    assert "tokenizer.chat_template" not in read_info(converted["unknown"].path).metadata


def test_a_hub_cache_checkpoint_gets_its_catalog_template(tmp_path):
    snapshot = tmp_path / "models--beomi--KoAlpaca-Polyglot-5.8B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for f in DEMO_HF.iterdir():
        (snapshot / f.name).symlink_to(f)
    result = pipeline.convert(snapshot, "f16", tmp_path / "k.gguf")
    assert result.template == "koalpaca"
    assert read_info(result.path).metadata["tokenizer.chat_template"] == templates.get("koalpaca").chat_template


def test_catalog_and_name_rules_agree():
    from malhae.store import catalog

    for entry in catalog.load():
        assert catalog.template_for(entry.hub_id) == entry.template
        assert catalog.template_for(entry.name.upper()) == entry.template
        assert templates.identify(entry.hub_id).name == entry.template  # also without the catalog
        assert templates.for_model(entry.name).name == entry.template  # what ask/chat pick by name
    assert catalog.template_for("my-own-model") is None and templates.identify("my-own-model") is None


def test_quantized_files_keep_the_template(k_quant_checkpoint, tmp_path):
    result = pipeline.convert(k_quant_checkpoint, "q4_k_m", tmp_path / "q.gguf", template="koalpaca")
    assert read_info(result.path).metadata["tokenizer.chat_template"] == templates.get("koalpaca").chat_template


def test_an_unknown_template_name_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="unknown template 'alpaca'"):
        pipeline.convert(DEMO_HF, "f16", tmp_path / "x.gguf", template="alpaca")
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_python_formats_chats_from_the_gguf_like_malhae(converted):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    for name in NAMES:
        llm = Llama(model_path=str(converted[name].path), vocab_only=True, verbose=False)
        assert llm.chat_format == "chat_template.default"  # it picked the GGUF's template by itself
        eos = llm._model.token_get_text(llm.token_eos())
        formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos,
                                        bos_token=llm._model.token_get_text(llm.token_bos()))
        for turns in CONVERSATIONS.values():
            for sys_text in SYSTEMS.values():
                assert formatter(messages=messages(turns, sys_text)).prompt == expected(name, turns, sys_text)
        llm.close()


def test_llama_cpp_builtin_template_function_does_not_know_these_formats():
    """llama_chat_apply_template only knows llama.cpp's built-in formats, detected by heuristics on the Jinja text;
    it returns -1 for a template it does not recognise (documented in llama.h). If a later llama.cpp recognised one
    of ours, it would have to render exactly our prompt."""
    import llama_cpp as lc

    turns = CONVERSATIONS["three"]
    for name in NAMES:
        chat = (lc.llama_chat_message * len(turns))(*[lc.llama_chat_message(r.encode(), t.encode())
                                                      for r, t in turns])
        buf = ctypes.create_string_buffer(1 << 14)
        n = lc.llama_chat_apply_template(templates.get(name).chat_template.encode(), chat, len(turns), True, buf,
                                         len(buf))
        if n != -1:
            assert buf.raw[:n].decode("utf-8") == expected(name, turns, None)


def test_malhae_reads_the_template_back_in_order_flag_gguf_name(converted):
    with Engine(LoadOptions(model=converted["koalpaca"].path, ctx=256)) as engine:
        assert templates.identify(engine.name) is None  # the name ("hf", the folder's) alone would mean base
        assert templates.for_engine(engine).name == "koalpaca"
    with Engine(LoadOptions(model=converted["unknown"].path, ctx=256)) as engine:
        assert templates.for_engine(engine).name == "base"
    meta = {"tokenizer.chat_template": templates.get("kullm").chat_template}
    assert templates.for_gguf("koalpaca-polyglot-12.8b", meta).name == "kullm"  # the file beats the name
    assert templates.for_gguf("koalpaca-polyglot-12.8b", {}).name == "koalpaca"


FOREIGN = ("{% for m in messages %}{{ bos_token }}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n"
           "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def with_chat_template(src: Path, dst: Path, source: str) -> Path:
    """A copy of a GGUF whose tokenizer.chat_template is `source` (a template from another tool)."""
    return copy_gguf(src, dst, fields={gguf.Keys.Tokenizer.CHAT_TEMPLATE: None},
                     extra=lambda writer: writer.add_chat_template(source))


def test_a_foreign_template_is_rendered_with_jinja_and_stops_at_eos(converted, tmp_path):
    path = with_chat_template(converted["unknown"].path, tmp_path / "foreign.gguf", FOREIGN)
    with Engine(LoadOptions(model=path, ctx=256)) as engine:
        tpl = templates.for_engine(engine)
        assert tpl.name == "gguf" and tpl.stop == ("<|endoftext|>",)
        prompt = tpl.prompt([("user", "안녕"), ("assistant", "네"), ("user", "또")], "시스템")
        assert prompt == ("<|endoftext|><system>시스템<|endoftext|>\n<|endoftext|><user>안녕<|endoftext|>\n"
                          "<|endoftext|><assistant>네<|endoftext|>\n<|endoftext|><user>또<|endoftext|>\n<assistant>")
        _, stats = engine.complete(prompt, Sampling(max_tokens=2, temperature=0))
        assert stats.prompt_tokens == len(engine.tokenize(prompt))


def test_broken_jinja_is_one_line():
    with pytest.raises(UserError, match="not valid Jinja"):
        templates.for_gguf("x", {"tokenizer.chat_template": "{% for %}"})
    failing = templates.for_gguf("x", {"tokenizer.chat_template": "{{ raise_exception('no system role') }}"})
    with pytest.raises(UserError, match="no system role"):
        failing.prompt([("user", "x")])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120)


def test_ask_uses_the_template_from_the_gguf(converted):
    question = "대한민국의 주권은 누구에게 있나요?"
    engine = Engine(LoadOptions(model=converted["kullm"].path, ctx=256))
    try:
        kullm_tokens = len(engine.tokenize(templates.get("kullm").prompt([("user", question)])))
        base_tokens = len(engine.tokenize(templates.get("base").prompt([("user", question)])))
    finally:
        engine.close()
    assert kullm_tokens != base_tokens
    proc = run_cli("ask", question, "-m", str(converted["kullm"].path), "-n", "4", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["template"] == "kullm"
    assert data["stats"]["prompt_tokens"] == kullm_tokens  # the engine was given the kullm framing
    forced = json.loads(run_cli("ask", question, "-m", str(converted["kullm"].path), "-n", "4", "--temperature",
                                "0", "--json", "--template", "base").stdout)
    assert forced["template"] == "base" and forced["stats"]["prompt_tokens"] == base_tokens  # the flag wins
