"""`/lora` in `malhae chat`, driven for real: a session on a converted base model with a converted PEFT adapter
(tests/lora_pair.py), its input read from a pipe as `malhae chat < file` reads it, llama.cpp applying the adapters.

What must hold: the set of adapters changes mid-conversation and the next answer is the set's own (greedy: the
adapter's answer with it, the base's answer again once it is removed, the conversation re-read each time), every
mistake is one line with the conversation intact, and /show, /save, /load and /model know of the adapters.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lora_pair
import pytest
from rich.console import Console

from malhae.chat import reader
from malhae.chat import session as chat_session
from malhae.runtime.settings import LoadOptions, Lora, Sampling
from malhae.store import models

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return lora_pair.build(tmp_path_factory.mktemp("lora-chat"))


def talk(model: Path, lines: list[str], **load) -> tuple[object, str, list[str]]:
    """A chat session reading `lines` from a pipe until they end: the session (closed), what it said on stderr, and
    every answer it wrote, in order (a /retry's too: the conversation keeps only the last)."""
    err = io.StringIO()
    options = LoadOptions(threads=1, gpu_layers=0, draft="off", **load)
    chat = chat_session.open_chat(options, model=str(model), resolve=models.resolve,
                                  sampling=Sampling(temperature=0, max_tokens=12, seed=1),
                                  reader=reader.LineReader(io.BytesIO("\n".join(lines).encode() + b"\n")),
                                  out=io.StringIO(), console=Console(file=err, width=200))
    written: list[str] = []
    keep = chat.write

    def write(prepared) -> None:
        keep(prepared)
        written.append(chat.conv.turns[-1][1])

    chat.write = write
    chat.run()
    return chat, err.getvalue(), written


def hints(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("malhae:")]


def test_adapters_change_mid_conversation(pair):
    """Added, listed, rescaled, removed at scale 0, added again, all removed: each answer is its set's own."""
    ad = str(pair.adapter)
    chat, err, written = talk(pair.base, ["/lora", "대한민국의 주권은", f"/lora {ad}", "/retry", "/lora",
                                          f"/lora {ad} 0.5", "/show", "/retry", f"/lora {ad}:0", "/retry",
                                          f"/lora {ad}", "/retry", "/lora off", "/retry"])
    assert "no adapters applied (none)" in err
    plain, adapted, half, zero, back, off = written
    assert len(chat.conv.turns) == 2  # /retry replaces the answer; the conversation goes on
    assert adapted != plain and half not in (plain, adapted)  # each set answers its own way
    assert zero == plain and back == adapted and off == plain  # the cache was re-read with each new set
    assert "adapters: adapter; the next answer reads the conversation again" in err
    assert "adapter · scale 1 · rank 4 · attn_output, attn_qkv, ffn_down, ffn_up" in err  # /lora lists it
    assert "adapters: adapter:0.5" in err and "LoRA adapters adapter:0.5" in err  # rescaled, and /show says so
    assert chat.load.lora == () and not hints(err)


def test_the_next_answer_reads_the_history_again_with_the_new_set(pair, tmp_path):
    """After a change, the conversation so far is evaluated again: the answer equals a fresh session's that never
    had the old set (its K/V, computed with the old adapters, would otherwise be reused)."""
    saved = tmp_path / "one.json"
    for before, after in ((f"/lora {pair.adapter}", "/lora off"), ("/lora off", f"/lora {pair.adapter}:0.7")):
        _, err, switched = talk(pair.base, [before, "대한민국의 주권은", f"/save {saved} --force", after, "국회는"])
        new_set = [] if after == "/lora off" else [after]
        _, err2, fresh = talk(pair.base, [*new_set, f"/load {saved}", "국회는"])
        assert switched[1] == fresh[0] and not hints(err) and not hints(err2)


def test_every_mistake_is_one_line_and_the_conversation_stays(pair, demo_path, tmp_path):
    ad = str(pair.adapter)
    other = tmp_path / "other.gguf"  # an adapter of another model: the demo's shapes differ
    chat, err, written = talk(pair.base, [
        "대한민국의 주권은", f"/lora {ad}", "/lora nosuch", f"/lora {ad} abc", f"/lora {ad} 1000", f"/lora {ad} nan",
        "/lora off nosuch", f"/lora {demo_path}", f"/lora {pair.base}", f"/lora {other}", "/lora off other",
        f"/lora {ad}:-1e9", "/retry"])
    said = hints(err)
    assert len(said) == 10, said
    assert "/lora nosuch" in said[0] and "malhae models" in said[0]
    assert all("the scale must be a number from -100 to 100" in line for line in said[1:4])
    assert "no adapter 'nosuch' is applied (applied: adapter)" in said[4]
    assert "is a model, not a LoRA adapter" in said[5] and "is a model, not a LoRA adapter" in said[6]
    assert "does not exist" in said[7] and "no adapter 'other' is applied" in said[8]
    assert "the scale must be" in said[9]
    assert len(chat.conv.turns) == 2 and len(written) == 2 and written[1] != written[0]  # the adapter still applies
    assert chat.load.lora == (Lora(pair.adapter),) and "Traceback" not in err


def test_an_adapter_of_another_model_is_refused_before_anything_changes(pair, demo_path):
    chat, err, written = talk(demo_path, ["국회는", f"/lora {pair.adapter}", "/retry"])
    said = hints(err)
    assert len(said) == 1 and "does not fit" in said[0] and pair.base.stem not in said[0]
    assert written[0] == written[1] and chat.load.lora == ()  # the same answer: nothing was applied


def test_save_load_and_model_know_the_adapters(pair, tmp_path):
    twin = tmp_path / "twin.gguf"  # the same model in another file: the adapter fits it
    shutil.copy(pair.base, twin)
    saved = tmp_path / "chat.json"
    chat, err, _ = talk(pair.base, ["대한민국의 주권은", f"/lora {pair.adapter}:0.5", f"/save {saved}", "/lora off",
                                    f"/load {saved}", f"/model {twin}", f"/lora {pair.adapter}"])
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["adapters"] == ["adapter:0.5"] and data["model"] == "lorabase"
    assert "it was saved with the adapters adapter:0.5; continuing with none (/lora changes them)" in err
    assert chat.engine.path == twin and chat.load.lora == (Lora(pair.adapter),)  # kept on a model it fits
    chat, err, _ = talk(pair.base, ["/lora " + str(pair.adapter), "/model demo", "/lora"])
    assert "does not fit malhae-demo-ko-f16.gguf and is left off" in err and chat.load.lora == ()
    assert "no adapters applied (none)" in err


def test_lora_on_an_endpoint_is_for_a_local_model(demo_path):
    pytest.importorskip("uvicorn")
    from helpers import serving

    with serving(demo_path, parallel=1, n_ctx=512) as server:
        proc = subprocess.run([sys.executable, "-m", "malhae", "chat", "--endpoint", server.url + "/v1"],
                              input=b"/lora\n/lora x.gguf\n/show\n", capture_output=True, cwd=ROOT, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "/lora is for a local model" in line]
    assert len(lines) == 2 and "malhae serve -m MODEL --lora NAME" in lines[0]
    assert "LoRA adapters" not in err
