"""The prompt cache on disk: a long prompt's state saved once and restored, never a wrong one, never unbounded.

All on the demo model, whose F16 weights give the same numbers for batched and single-row evaluation here, so an
answer after a restore must equal the answer after a full evaluation token for token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from malhae.runtime import prompt_cache
from malhae.runtime.engine import Engine, common_prefix
from malhae.runtime.settings import LoadOptions, Sampling

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import one_error_line, serving  # noqa: E402

CONSTITUTION = Path(__file__).resolve().parents[1] / "models" / "data" / "ko-public-domain" / "constitution.txt"
GREEDY = Sampling(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def text() -> str:
    return CONSTITUTION.read_text(encoding="utf-8")  # the project's own copy of public-domain text


@pytest.fixture
def options(demo_path, tmp_path) -> LoadOptions:
    return LoadOptions(model=demo_path, ctx=1024, threads=2, prompt_cache=tmp_path / "prompt-cache")


def _answer(options: LoadOptions, prompt: str) -> tuple[str, int, list[int]]:
    """(greedy text, tokens restored from disk, the prompt's tokens) from a fresh engine."""
    with Engine(options) as engine:
        text = engine.complete(prompt, GREEDY)[0]
        return text, engine.stats.restored_tokens, engine.tokenize(prompt)


def _files(options: LoadOptions) -> list[Path]:
    return sorted(options.prompt_cache.rglob("*.kv")) if options.prompt_cache.exists() else []


def test_a_restored_prompt_answers_as_a_full_evaluation(options, text):
    document = text[:1500]
    first, restored, tokens = _answer(options, document + "\n질문: 국회의원의 임기는?\n답:")
    assert restored == 0 and len(_files(options)) == 1  # read once, saved
    prompt = document + "\n질문: 대통령의 임기는?\n답:"
    again, restored, tokens = _answer(options, prompt)
    plain, none, _ = _answer(replace(options, prompt_cache=None), prompt)
    assert none == 0
    with Engine(replace(options, prompt_cache=None)) as engine:
        shared = common_prefix(engine.tokenize(document + "\n질문: 국회의원의 임기는?\n답:"), tokens)
    assert restored == shared >= prompt_cache.MIN_TOKENS  # the document came from disk, the question was read
    assert again == plain  # token for token


def test_the_longest_saved_prefix_wins(options, text):
    base, a, b = text[:700], text[700:1400], text[2000:2700]
    _answer(options, base + a)
    _answer(options, base + b)
    assert len(_files(options)) == 2  # two branches of one prefix: neither extends the other
    with Engine(replace(options, prompt_cache=None)) as engine:
        want = len(engine.tokenize(base + a))
    _, restored, _ = _answer(options, base + a + "\n질문: 무엇인가?")
    assert restored >= want - 1  # the branch holding a, not the shorter one shared with b


def test_another_setup_never_gets_the_state(options, text, tmp_path):
    prompt = text[:1500] + "\n요약:"
    _answer(options, prompt)
    for other in (replace(options, kv_cache_k="q8_0", kv_cache_v="q8_0"), replace(options, flash_attn="off")):
        assert _answer(other, prompt)[1] == 0
    copy = tmp_path / "copy.gguf"  # the same bytes in another file, written later: another identity
    shutil.copyfile(options.model, copy)
    assert _answer(replace(options, model=copy), prompt)[1] == 0
    os.utime(copy, (1, 1))  # the same file changed under its name (mtime): its states are not its own any more
    assert _answer(replace(options, model=copy), prompt)[1] == 0
    assert _answer(options, prompt)[1] > 0  # and the original still finds its own


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "nested"])
def test_a_damaged_file_is_removed_never_restored(options, text, damage):
    prompt = text[:1500] + "\n요약:"
    want = _answer(replace(options, prompt_cache=None), prompt)[0]
    _answer(options, prompt)
    [path] = _files(options)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x40  # one bit of the K/V values: only the CRC can tell
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "foreign":
        data = bytearray(b"GGUF" + os.urandom(4096))
    else:  # ours on the outside, a header nested past any bound inside
        nested = b"[" * 60_000 + b"]" * 60_000
        data = bytearray(prompt_cache._HEADER.pack(prompt_cache.MAGIC, prompt_cache.VERSION, 65_536) + nested[:65_536])
    path.write_bytes(bytes(data))
    text_after, restored, _ = _answer(options, prompt)
    assert restored == 0 and text_after == want
    assert path not in _files(options) or path.read_bytes() != bytes(data)  # removed (then saved afresh)


def test_the_size_cap_evicts_the_least_recently_used(options, text):
    _answer(options, text[:1500])
    [first] = _files(options)
    cap = first.stat().st_size * 1.5 / 2**30  # room for one entry
    small = replace(options, prompt_cache_max=cap)
    _answer(small, text[3000:4500])
    files = _files(options)
    assert len(files) == 1 and files[0] != first
    tiny = replace(options, prompt_cache_max=files[0].stat().st_size / 3 / 2**30)  # smaller than any state
    _answer(tiny, text[5000:6500])
    assert _files(options) == files  # not written: it would only have evicted everything, itself included


def test_a_served_request_restores_and_answers_the_same(demo_path, text, tmp_path):
    from openai import OpenAI

    document = text[:1500]
    answers = {}
    for cached in (None, tmp_path / "pc"):
        with serving(demo_path, parallel=2, n_ctx=1024, prompt_cache=cached) as server:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
            for question in ("\n질문: 국회의원의 임기는?\n답:", "\n질문: 대통령의 임기는?\n답:"):
                out = client.completions.create(model="m", prompt=document + question, max_tokens=10, temperature=0)
                answers.setdefault(cached is None, []).append(
                    (out.choices[0].text, out.usage.prompt_tokens_details.cached_tokens))
    plain, restored = answers[True], answers[False]
    assert [t for t, _ in plain] == [t for t, _ in restored]
    assert restored[1][1] >= prompt_cache.MIN_TOKENS  # the second request's document came from disk …
    assert list((tmp_path / "pc").rglob("*.kv"))


def _malhae(*args: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"MALHAE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, env=env, timeout=120,
                          input=stdin.encode() if stdin else None)


def test_ask_file_twice_then_cache_lists_and_clears(text, tmp_path):
    home, doc = tmp_path / "home", tmp_path / "헌법.txt"
    doc.write_text(text[:1500], encoding="utf-8")
    runs = [json.loads(_malhae("ask", "대통령의 임기는?", "--file", str(doc), "-m", "demo", "-n", "8",
                               "--temperature", "0", "--json", home=home).stdout) for _ in range(2)]
    assert runs[0]["stats"]["restored_tokens"] == 0 and runs[1]["stats"]["restored_tokens"] >= 128
    assert runs[0]["text"] == runs[1]["text"]
    listed = json.loads(_malhae("cache", "--json", home=home).stdout)
    assert [e["model"] for e in listed["entries"]] == ["malhae-demo-ko-f16.gguf"] and listed["bytes"] > 0
    assert listed["dir"] == str(home / "cache" / "prompt-cache")
    cleared = _malhae("cache", "clear", "demo", home=home)
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout.decode()
    assert json.loads(_malhae("cache", "--json", home=home).stdout)["entries"] == []


def test_turned_off_writes_nothing(text, tmp_path):
    home, doc = tmp_path / "home", tmp_path / "doc.txt"
    doc.write_text(text[:1500], encoding="utf-8")
    ask = ("ask", "요약", "--file", str(doc), "-m", "demo", "-n", "4")
    assert _malhae(*ask, "--no-prompt-cache", home=home).returncode == 0
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text("prompt_cache = false\n", encoding="utf-8")
    assert _malhae(*ask, home=home).returncode == 0
    assert not (home / "cache").exists()
    (home / "config.toml").write_text('prompt_cache = "yes"\n', encoding="utf-8")
    line = one_error_line(_malhae(*ask, home=home))
    assert "prompt_cache must be true or false" in line


def test_chat_read_says_it_came_from_cache(text, tmp_path):
    home, doc = tmp_path / "home", tmp_path / "헌법.txt"
    doc.write_text(text[:1500], encoding="utf-8")
    script = f"/read {doc}\n요약해 주세요\n/stats\n"
    first, second = (_malhae("chat", "-m", "demo", "--temperature", "0", "-n", "8", home=home, stdin=script)
                     for _ in range(2))
    assert first.returncode == second.returncode == 0
    assert "from cache" not in first.stdout.decode() + first.stderr.decode()
    said = second.stdout.decode() + second.stderr.decode()
    assert "prompt tokens from cache" in said and "from the prompt cache on disk" in said, said
    answer = [line for line in first.stdout.decode().splitlines() if "대" in line]
    assert answer and answer[0] in second.stdout.decode()  # the same answer


def test_only_what_was_expensive_to_read_is_saved():
    """A CPU that read 1,024 tokens of the 1.3b shape in 9.3 s saves its 201 MB state (restoring takes about 0.2 s);
    a GPU that read them in 0.05 s does not: reading them again is as quick as reading the state from disk. Fewer
    than MIN_TOKENS tokens are never saved, however slow."""
    assert prompt_cache.worth_saving(1024, 9.3, 201_339_480)
    assert not prompt_cache.worth_saving(1024, 0.05, 201_339_480)
    assert not prompt_cache.worth_saving(prompt_cache.MIN_TOKENS - 1, 60.0, 1_000_000)


def test_a_cache_that_cannot_be_written_is_only_slower(text, tmp_path):
    """The cache folder's place taken by a file: nothing can be saved or found there, and every command still works
    (the cache is a cache: it never fails a run)."""
    home, doc = tmp_path / "home", tmp_path / "doc.txt"
    doc.write_text(text[:1500], encoding="utf-8")
    home.mkdir()
    (home / "cache").write_text("not a folder", encoding="utf-8")
    for _ in range(2):
        proc = _malhae("ask", "요약", "--file", str(doc), "-m", "demo", "-n", "4", "--json", home=home)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr  # nor from the writer thread
        assert json.loads(proc.stdout)["stats"]["restored_tokens"] == 0
    listed = _malhae("cache", "--json", home=home)
    assert listed.returncode == 0 and json.loads(listed.stdout)["entries"] == []
    assert _malhae("cache", "clear", home=home).returncode == 0


def test_cache_lists_a_foreign_name_without_its_control_characters(tmp_path):
    """An entry's model name comes from its file: an escape sequence in it is not sent to the terminal."""
    home = tmp_path / "home"
    root = home / "cache" / "prompt-cache"
    cache = prompt_cache.PromptCache(root, root / "x", "evil\x1b[2J\x1b]0;title\x07.gguf")
    cache.save(list(range(200)), b"\0" * 1000)
    cache.wait()
    proc = _malhae("cache", home=home)
    assert proc.returncode == 0 and b"evil" in proc.stdout
    assert b"\x1b" not in proc.stdout + proc.stderr and b"\x07" not in proc.stdout
