"""`malhae serve` without -m: the whole store by name, loaded on demand, unloaded when idle (issue 31).

Real HTTP on 127.0.0.1, the real `ollama` and `openai` clients, real models: the demo (as demo-f16 in the store), a
Q8_0 quantization of it (demo-q8) and the demo's LoRA adapter, which is served by its own name (a preset: the demo
with the adapter).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from helpers import serving_store

pytest.importorskip("starlette")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

QUESTION = "대한민국의 주권은 누구에게 있나요?"


@pytest.fixture(scope="module")
def q8(tmp_path_factory, demo_path):
    """The demo quantized to Q8_0 (llama.cpp's quantizer): the same tokenizer and template, other weights."""
    from gguf import LlamaFileType

    from malhae.runtime import quant

    out = tmp_path_factory.mktemp("q8") / "demo-q8.gguf"
    assert quant.quantize_file(demo_path, out, int(LlamaFileType.MOSTLY_Q8_0), 2) == 0
    return out


@pytest.fixture
def store(home, demo_path, q8):
    """A store with demo-f16 and demo-q8 (the bundled demo and its adapter are served too)."""
    from malhae.store.local import open_store

    s = open_store()
    s.add(demo_path, "demo-f16")
    s.add(q8, "demo-q8")
    return s


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def ask(home, *args: str) -> str:
    """What `malhae ask` answers, greedy, as a server request below asks."""
    env = os.environ | {"MALHAE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "malhae", "ask", QUESTION, "--temperature", "0", "--max-tokens",
                           "24", "--repeat-penalty", "1", "--ctx", "512", "--threads", "2", "--draft", "off",
                           "--no-prompt-cache", *args], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


def loaded(client) -> list[str]:
    return sorted(m.model for m in client.ps().models)


def test_the_store_by_name_with_the_ollama_client(store, home):
    expected = {name: ask(home, "-m", name) for name in ("demo-f16", "demo-q8")}
    expected["demo-signoff"] = ask(home, "-m", "demo", "--lora", "demo-signoff")
    assert expected["demo-signoff"] != expected["demo-f16"]  # the adapter's sign-off: the names run other things
    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        assert {"demo-f16", "demo-q8", "demo", "demo-signoff"} <= {m.model for m in c.list().models}
        assert loaded(c) == []  # nothing loads before it is asked for
        shown = c.show("demo-q8")  # read from the file's header: still nothing loaded
        assert shown.details.quantization_level == "Q8_0" and loaded(c) == []
        for name in ("demo-q8", "demo-f16", "demo-signoff", "demo-q8", "demo-f16", "demo-signoff"):
            out = c.chat(model=name, messages=[{"role": "user", "content": QUESTION}],
                         options={"temperature": 0, "num_predict": 24})
            assert out.message.content.strip() == expected[name], name
            assert out.model == name
        # the preset runs on its base, which is loaded once for both names
        assert loaded(c) == ["demo", "demo-f16", "demo-q8"]
        assert c.show("demo-q8").details.quantization_level == "Q8_0"  # and the same once loaded
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 404 and "demo-q8" in e.value.error  # the 404 lists the names


def test_the_openai_client_lists_and_picks_models(store):
    with serving_store() as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)
        assert {"demo-f16", "demo-q8"} <= {m.id for m in c.models.list().data}
        out = c.chat.completions.create(model="demo-q8", messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=4, temperature=0)
        assert out.model == "demo-q8" and out.usage.completion_tokens <= 4
        assert c.models.retrieve("demo-q8").id == "demo-q8"
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="gpt-4", prompt="x", max_tokens=1)
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("gpt-4")


def test_keep_alive_zero_unloads_and_gives_the_memory_back(store):
    """A large KV cache (4 slots of 4,096 tokens) makes the model's memory stand out of the process's own."""
    with serving_store(parallel=4, n_ctx=4096) as server:
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-f16", prompt="", keep_alive=0)  # the first load maps llama.cpp's backends for good
        c.generate(model="demo-f16", prompt="")  # Ollama's preload: an empty prompt
        assert loaded(c) == ["demo-f16"]
        c.generate(model="demo-f16", prompt="", keep_alive=0)
        before = rss()
        c.generate(model="demo-f16", prompt="")
        assert loaded(c) == ["demo-f16"]
        c.generate(model="demo-f16", prompt=QUESTION, options={"num_predict": 4})  # its pages touched
        during = rss()
        out = c.generate(model="demo-f16", prompt="", keep_alive=0)
        assert out.done_reason == "unload" and loaded(c) == []
        after = rss()
        grew = during - before
        assert grew > 32 << 20, (before, during)  # the KV cache at least
        assert after - before < grew / 4, (before, during, after)


def test_an_idle_model_is_unloaded_when_its_keep_alive_runs_out(store):
    with serving_store(keep_alive=None) as server:
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2}, keep_alive="1s")
        c.generate(model="demo-f16", prompt=QUESTION, options={"num_predict": 2})  # the server's: for ever
        listed = {m.model: m for m in c.ps().models}
        assert set(listed) == {"demo-q8", "demo-f16"}
        assert listed["demo-f16"].expires_at.year == 1  # Ollama's zero time: never
        end = time.monotonic() + 30
        while "demo-q8" in loaded(c) and time.monotonic() < end:
            time.sleep(0.1)
        assert loaded(c) == ["demo-f16"]  # without any request, and only the one that expired


def _needs(store, n_ctx: int = 512):
    """Each model's RAM as the server plans it (serving_store's settings)."""
    from dataclasses import replace

    from malhae.runtime import memory
    from malhae.runtime.settings import LoadOptions

    options = LoadOptions(threads=2, parallel=2, ctx=n_ctx)
    return {n: memory.need(replace(options, model=store.get(n).path)).ram for n in ("demo-f16", "demo-q8")}


def _ps(server) -> list[dict]:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/api/ps", timeout=30) as resp:
        return json.loads(resp.read())["models"]


def _stream(server, model: str, tokens: int, *, held: bool = False):
    """A long streamed completion, left open: (its response, the connection). `held`: a receive buffer so small that
    the server cannot send ahead of the reader, so that the request stays in progress (its model busy) for as long as
    the test does not read, however fast the machine generates."""
    import http.client
    import socket

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    if held:
        conn.sock = socket.socket()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sock.settimeout(120)
        conn.sock.connect(("127.0.0.1", server.port))
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": model, "prompt": "대한민국", "max_tokens": tokens, "ignore_eos": True, "stream": True,
        "temperature": 0}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()
    return resp, conn


def test_a_memory_cap_evicts_the_idle_model_and_waits_for_a_busy_one(store):
    needs = _needs(store, 2048)
    cap = max(needs.values()) + (1 << 20)  # room for either model, not both
    assert cap < sum(needs.values())
    with serving_store(max_memory=cap, n_ctx=2048) as server:
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-f16", prompt=QUESTION, options={"num_predict": 2})
        c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2})
        assert loaded(c) == ["demo-q8"]  # the idle one made room
        resp, conn = _stream(server, "demo-q8", 2000)  # busy for a while (not read)
        answered: list = []
        waiting = threading.Thread(target=lambda: answered.append(
            c.generate(model="demo-f16", prompt=QUESTION, options={"num_predict": 2})))
        waiting.start()
        seen: list[dict] = []
        try:
            end = time.monotonic() + 120
            while not answered and time.monotonic() < end:  # what the server holds, until demo-f16 answers
                seen.append({m["name"]: m for m in _ps(server)})  # malhae's fields too: requests, state
                time.sleep(0.01)
            rest = resp.read().decode()  # the busy model's answer, to its end
        finally:
            conn.close()
        waiting.join(60)
        assert answered and answered[0].response
        assert loaded(c) == ["demo-f16"]
        # the busy model was not unloaded under its request: its stream ran to its 2,000th token and ended well …
        chunks = [json.loads(line[5:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "error" not in rest
        assert len(chunks) >= 1500  # (the first chunk was read by _stream; the usage chunk ends it)
        # … demo-f16 came in only once demo-q8 had no request left …
        assert not [s for s in seen if "demo-f16" in s and s.get("demo-q8", {}).get("requests")], seen
        # … and it did wait: the server was seen holding the busy demo-q8 while demo-f16's request was in flight
        assert any(s.get("demo-q8") is not None and s["demo-q8"]["requests"] >= 1 for s in seen), seen


def test_a_model_too_large_for_the_cap_is_refused_with_the_reason(store):
    needs = _needs(store)
    with serving_store(max_memory=min(needs.values()) // 2) as server:
        c = ollama.Client(host=server.url, timeout=120)
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="demo-q8", prompt="x")
        assert e.value.status_code == 507 and "--max-memory" in e.value.error
        assert loaded(c) == []


def test_a_removed_or_corrupt_file_fails_its_requests_only(store, demo_path):
    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2})
        bad = store.root / ".bad.gguf"
        bad.write_bytes(b"GGUF" + b"\x00" * 64)
        os.replace(bad, store.get("demo-q8").path)  # replaced in place, as a broken copy would be
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="demo-q8", prompt=QUESTION)
        assert e.value.status_code >= 400 and "demo-q8" in e.value.error
        assert "demo-q8" not in loaded(c)  # the old one was unloaded: its file is gone
        assert c.generate(model="demo-f16", prompt=QUESTION, options={"num_predict": 2}).response  # others go on
        store.get("demo-f16").path.unlink()
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="demo-f16", prompt=QUESTION)
        assert e.value.status_code == 404


def test_a_failed_load_leaves_nothing_behind_and_the_next_request_retries(store, q8):
    path = store.get("demo-q8").path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads; the tensors are cut short
    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="demo-q8", prompt=QUESTION)
        assert e.value.status_code == 500 and "demo-q8" in e.value.error
        assert loaded(c) == []  # nothing half-loaded
        shutil.copyfile(q8, path)
        assert c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2}).response
        assert loaded(c) == ["demo-q8"]


def test_a_loaded_model_streams_on_while_another_loads(store):
    """Tokens of a stream keep coming while another model loads (in a thread of its own, the event loop free): five
    loads of demo-q8 during one long stream of demo-f16. The demo's decode is so small that it is bound by Python, and
    the load's own Python (its header, its vocabulary) competes with it for the GIL, so the stream slows while a load
    runs; what this checks is that it never stops. How fast a real model streams meanwhile is measured in
    benchmarks/serve_models.py."""
    with serving_store(n_ctx=4096) as server:
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-f16", prompt="", keep_alive=-1)
        resp, conn = _stream(server, "demo-f16", 4000)
        stamps: list[float] = []
        stop = threading.Event()

        def read() -> None:
            try:
                while not stop.is_set() and resp.readline():
                    stamps.append(time.monotonic())
            except (OSError, ValueError, AttributeError):  # the connection closed under it: the test is over
                pass

        reader = threading.Thread(target=read)
        reader.start()
        windows: list[tuple[float, float]] = []
        try:
            end = time.monotonic() + 30
            while len(stamps) < 20 and time.monotonic() < end:
                time.sleep(0.01)
            for _ in range(5):
                start = time.monotonic()
                c.generate(model="demo-q8", prompt="")  # a load and nothing else
                windows.append((start, time.monotonic()))
                c.generate(model="demo-q8", prompt="", keep_alive=0)
                time.sleep(0.05)
        finally:
            stop.set()
            conn.close()
            reader.join(10)
        inside = sum(1 for t in stamps if any(a <= t <= b for a, b in windows))
        loading = sum(b - a for a, b in windows)
        first, last = windows[0][0], windows[-1][1]
        outside = sum(1 for t in stamps if first <= t <= last) - inside
        rate_outside = outside / max(1e-9, (last - first) - loading)
        assert inside >= 5, (inside, loading, rate_outside)
        assert inside / loading >= 0.05 * rate_outside, (inside, loading, rate_outside)


def test_malhae_ps_and_stop_talk_to_the_running_server(store, home):
    env = os.environ | {"MALHAE_HOME": str(home)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, env=env, timeout=120)

    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        first = c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2})
        again = c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2})
        assert first.load_duration > 0 and again.load_duration == 0  # Ollama's: the wait for the load
        shown = cli("ps", "--url", server.url)
        assert shown.returncode == 0 and "demo-q8" in shown.stdout.decode() and "CPU" in shown.stdout.decode()
        listed = json.loads(cli("ps", "--json", "--url", server.url).stdout)
        assert [m["name"] for m in listed["models"]] == ["demo-q8"]
        stopped = cli("stop", "demo-q8", "--url", server.url)
        assert stopped.returncode == 0 and "stopped demo-q8" in stopped.stdout.decode()
        assert loaded(c) == []
        again = cli("stop", "demo-q8", "--url", server.url)
        assert again.returncode == 0 and "was not loaded" in again.stdout.decode()
        unknown = cli("stop", "nope", "--url", server.url)
        assert unknown.returncode == 1 and "is not here" in unknown.stderr.decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sets a thread's priority per thread")
def test_models_loaded_on_demand_decode_at_the_servers_priority(store):
    """Loads run niced (+10), and a thread inherits its creator's niceness, which it cannot undo unprivileged: a
    scheduler thread born in the loader decoded at nice 10, at 0.23x its speed while the next model loaded."""
    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2})
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        schedulers = [t for t in threading.enumerate() if t.name == "malhae-scheduler"]
        assert schedulers
        assert [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in schedulers] == [mine] * len(schedulers)


def test_a_name_is_never_a_file_of_the_server(store, tmp_path, monkeypatch, demo_path):
    """The CLI reads `-m X` as a file when X exists; a request's model is a name only, whatever lies in the
    server's working folder, and a path is a 404."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-q8").write_text("not a model")
    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        assert c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2}).response
        for path in (str(demo_path), "./demo-q8", "../models/demo-q8.gguf", "~/demo-q8"):
            with pytest.raises(ollama.ResponseError) as e:
                c.generate(model=path, prompt=QUESTION)
            assert e.value.status_code == 404, path


def test_a_gpu_with_room_for_one_model_gets_it_from_the_idle_one(store, monkeypatch):
    """A faked GPU (tests/fake_devices.py: ggml's device list replaced, llama.cpp itself real and on the CPU) whose
    free memory is what the loaded models' plans leave: room for either model whole, not both. Asking for the second
    unloads the idle first so that the second is offloaded whole (Ollama's preference), though RAM would hold it."""
    import fake_devices
    from fake_devices import GiB

    from malhae.runtime import devices

    state: dict = {}

    def listed():
        pool = state["server"].state.pool if "server" in state else None
        # what the models in memory hold (one being loaded is what asks)
        used = sum(r.need.vram for r in pool.snapshot() if r.state == "ready") if pool is not None else 0
        return (fake_devices.cuda(0, max(0, state["total"] - used), state["total"]), fake_devices.cpu())

    loads = fake_devices.install(monkeypatch, fake_devices.cuda(0, 24 * GiB), fake_devices.cpu())
    from dataclasses import replace

    from malhae.runtime import memory
    from malhae.runtime.settings import LoadOptions

    base = LoadOptions(threads=2, parallel=2, ctx=512)
    whole = {n: memory.need(replace(base, model=store.get(n).path)).vram for n in ("demo-f16", "demo-q8")}
    state["total"] = max(whole.values()) + min(whole.values()) // 2  # one whole, not both
    monkeypatch.setattr(devices, "listed", listed)
    with serving_store() as server:
        state["server"] = server
        c = ollama.Client(host=server.url, timeout=120)
        c.generate(model="demo-f16", prompt=QUESTION, options={"num_predict": 2})
        c.generate(model="demo-q8", prompt=QUESTION, options={"num_predict": 2})
        assert loaded(c) == ["demo-q8"]  # demo-f16 made room, though --max-memory (80% of RAM) had plenty
        n_layer = 6  # the demo's
        assert loads.layers == [n_layer + 1, n_layer + 1]  # each was offloaded whole
        on_gpu = {m["name"]: m["size_vram"] for m in _ps(server)}
        assert on_gpu == {"demo-q8": whole["demo-q8"]}


def test_a_models_own_settings_shape_its_answers(store):
    """`malhae models set` data at work in the server: the model's max_tokens, sampling and system text under a
    request's own values; /api/show shows them as Ollama shows a Modelfile's; an adapter preset names its adapter."""
    from malhae.store import model_settings

    with serving_store() as server:
        c = ollama.Client(host=server.url, timeout=120)
        plain = c.chat(model="demo-q8", messages=[{"role": "user", "content": QUESTION}],
                       options={"temperature": 0, "num_predict": 8})
        model_settings.update(store, "demo-q8", {"max_tokens": "3", "temperature": "0",
                                                 "system": "너는 대한민국 헌법을 잘 아는 도우미야."})
        own = c.chat(model="demo-q8", messages=[{"role": "user", "content": QUESTION}])
        assert own.eval_count == 3  # the model's max_tokens, where a chat would run to the end of the context
        assert own.prompt_eval_count > plain.prompt_eval_count  # its system text framed the question
        told = c.chat(model="demo-q8", messages=[{"role": "user", "content": QUESTION}], options={"num_predict": 5})
        assert told.eval_count == 5  # the request's own value beats the model's
        shown = c.show("demo-q8")
        assert "num_predict 3" in shown.parameters and "temperature 0.0" in shown.parameters
        import urllib.request

        raw = urllib.request.Request(f"{server.url}/api/show", data=json.dumps({"model": "demo-q8"}).encode())
        with urllib.request.urlopen(raw, timeout=30) as resp:  # Ollama's `system`, which its client does not read
            assert json.loads(resp.read())["system"] == "너는 대한민국 헌법을 잘 아는 도우미야."
        assert "ADAPTER malhae-demo-ko-lora-signoff.gguf" in c.show("demo-signoff").modelfile
        assert [m["context_length"] for m in _ps(server)] == [512]  # the server's --ctx
        model_settings.update(store, "demo-q8", {"ctx": "256"})  # a load setting: loaded again, once idle
        c.chat(model="demo-q8", messages=[{"role": "user", "content": QUESTION}])
        assert [(m["name"], m["context_length"]) for m in _ps(server)] == [("demo-q8", 256)]
