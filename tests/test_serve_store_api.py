"""Ollama's /api/pull and /api/delete on `malhae serve` (issue 31), through the real `ollama` client: a pull from a
stand-in hub (test_pull's FakeHub, in a child server whose HF_ENDPOINT points at it), an offline pull, a delete, and
what is refused (a busy model, a server of one model)."""

from __future__ import annotations

import os
import socket

import pytest
from helpers import serving, serving_store
from test_cli_serve import start, wait_for
from test_pull import HUB_ID, FakeHub, repo  # noqa: F401 (repo: the fixture)

ollama = pytest.importorskip("ollama")


def _server(tmp_path, endpoint: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint, "MALHAE_HOME": str(tmp_path / "malhae"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    proc = start(env=env)
    port = wait_for(proc, r"serving on http://127\.0\.0\.1:(\d+)")[0].group(1)
    wait_for(proc, r"ready:")
    return proc, ollama.Client(host=f"http://127.0.0.1:{port}", timeout=300)


def test_pull_then_delete_with_the_ollama_client(tmp_path, repo):  # noqa: F811
    with FakeHub({HUB_ID: repo}) as hub:
        proc, c = _server(tmp_path, hub.url)
        try:
            lines = list(c.pull("polyglot-ko-1.3b:f16", stream=True))
            assert lines[-1].status == "success"
            assert any(line.total for line in lines[:-1])  # progress came as it went
            assert "polyglot-ko-1.3b-f16" in {m.model for m in c.list().models}
            store = tmp_path / "malhae" / "models" / "polyglot-ko-1.3b-f16.gguf"
            assert store.is_file()
            out = c.generate(model="polyglot-ko-1.3b-f16", prompt="대한민국", raw=True, options={"num_predict": 3})
            assert out.done  # the pulled model runs by name at once
            assert c.delete("polyglot-ko-1.3b-f16").status == "success"
            assert not store.exists() and [m.model for m in c.ps().models] == []  # unloaded, then removed
            with pytest.raises(ollama.ResponseError) as e:
                c.delete("polyglot-ko-1.3b-f16")
            assert e.value.status_code == 404
        finally:
            proc.kill()
            proc.wait(30)


def test_an_offline_pull_is_one_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, c = _server(tmp_path, f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ollama.ResponseError) as e:
            list(c.pull("polyglot-ko-1.3b", stream=True))
        assert e.value.status_code == 400 and "cannot reach the Hugging Face hub" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            c.pull("no-such-model-in-the-catalog")
        assert e.value.status_code == 400 and "catalog" in e.value.error
        assert c.list().models is not None and proc.poll() is None  # still serving
    finally:
        proc.kill()
        proc.wait(30)


def test_a_busy_model_is_not_deleted_and_one_model_servers_refuse(home, demo_path):
    import http.client
    import json

    from malhae.store.local import open_store

    open_store().add(demo_path, "mine")
    with serving_store(n_ctx=2048) as server:
        c = ollama.Client(host=server.url, timeout=120)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "mine", "prompt": "대한민국",
                                                                 "max_tokens": 2000, "ignore_eos": True,
                                                                 "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline()
        try:
            with pytest.raises(ollama.ResponseError) as e:
                c.delete("mine")
            assert e.value.status_code == 409 and "answering requests" in e.value.error
            assert (home / "models" / "mine.gguf").is_file()
        finally:
            conn.close()
    with serving(demo_path) as server:
        c = ollama.Client(host=server.url, timeout=120)
        with pytest.raises(ollama.ResponseError) as e:
            c.delete("anything")
        assert e.value.status_code == 400 and "-m" in e.value.error
