"""The KV cache's type in the planner's front ends: `--gpu-layers auto` and `serve --parallel` on faked GPUs (llama.cpp
real), `recommend`'s longest contexts per type, `info`, chat's /show and serve's ready line. The figures are checked
against arithmetic written out here, not against what the code under test computes alone."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager

import pytest

from malhae.runtime import kv, offload
from malhae.runtime.engine import Engine
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions
from malhae.store import catalog, recommend
from malhae.store.catalog import QUALITY_ORDER
from malhae.store.info import describe

GiB = 2**30
# bytes per cached value, from the formats: f16 is 2 bytes; q8_0 stores 32 values in 34 bytes, q4_0 in 18
PER_VALUE = {"f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}
DEMO_LAYERS, DEMO_EMBD = 6, 256  # the bundled demo's shape (gptneox.block_count, embedding_length)


def _kv_bytes(cells: int, layers: int, n_embd: int, type_name: str) -> int:
    """K and V of every layer, written out: cells × layers × 2 (K, V) × n_embd values."""
    return int(cells * layers * 2 * n_embd * PER_VALUE[type_name])


def _free_for(sizes: offload.ModelSizes) -> int:
    """Free bytes with which exactly these sizes fit on one GPU (offload.py's rule: 5 % spare, 400 MiB context)."""
    return int((sizes.total + offload.DEVICE_CONTEXT_BYTES) / (1 - offload.SAFETY_FRACTION)) + 4096


def _demo_sizes(demo_path, cells: int, type_name: str) -> offload.ModelSizes:
    return offload.model_sizes(read_info(demo_path), cells, kv_types=(type_name, type_name))


def _options(demo_path, type_name: str, **more) -> LoadOptions:
    return LoadOptions(model=demo_path, ctx=1024, parallel=8, threads=1, gpu_layers="auto", kv_cache_k=type_name,
                       kv_cache_v=type_name, **more)


def test_q8_0_puts_more_layers_on_the_gpu_than_f16(demo_path, monkeypatch):
    """A CUDA card (faked) with room for the demo and 8 slots of 1,024 tokens at q8_0 but not at f16: the engine
    plans every layer with q8_0 and fewer with f16, llama.cpp is asked for exactly those and allocates what the
    planner counted."""
    import fake_devices as fake

    cells = kv.cells(1024, 8)
    assert cells == 8192
    q8 = _demo_sizes(demo_path, cells, "q8_0")
    assert q8.kv_bytes_per_layer * DEMO_LAYERS == _kv_bytes(cells, DEMO_LAYERS, DEMO_EMBD, "q8_0")  # 25.5 MiB
    free = _free_for(q8)
    # by hand: what is left for K/V after the weights, compute buffer and context holds q8_0's cache, not f16's
    left = free * (1 - offload.SAFETY_FRACTION) - offload.DEVICE_CONTEXT_BYTES - q8.compute_bytes \
        - sum(q8.layer_bytes) - q8.output_bytes
    assert _kv_bytes(cells, DEMO_LAYERS, DEMO_EMBD, "q8_0") <= left < _kv_bytes(cells, DEMO_LAYERS, DEMO_EMBD, "f16")
    loads = fake.install(monkeypatch, fake.cuda(0, free, 24 * GiB), fake.cpu())
    layers = {}
    for type_name in ("q8_0", "f16"):
        with Engine(_options(demo_path, type_name)) as engine:
            layers[type_name] = engine.plan.n_gpu_layers
            assert loads.layers[-1] == engine.plan.n_gpu_layers  # llama.cpp was asked for the plan
            report = engine.ctx.kv_report
            assert report is not None and (report.k, report.v) == (type_name, type_name)
            assert report.mib == pytest.approx(_kv_bytes(cells, DEMO_LAYERS, DEMO_EMBD, type_name) / 2**20, abs=0.006)
    assert layers["q8_0"] == DEMO_LAYERS + 1  # everything, the output layer included
    assert 0 < layers["f16"] < layers["q8_0"], layers


@contextmanager
def _serving(options: LoadOptions):
    from malhae.serve.server import Options, Server

    with Server(Options(load=options, model_id="m", port=0)) as server:
        yield server


def test_serve_counts_every_slots_cache_at_the_chosen_type(demo_path, monkeypatch):
    """serve --parallel 8: offload.choose counts 8 slots of K/V at the server's type (as by hand, for 1 to 8 slots),
    so on the same faked card q8_0 serves fully on the GPU and answers, and f16 does not fit whole."""
    pytest.importorskip("uvicorn")
    import fake_devices as fake
    from test_serve import request

    info = read_info(demo_path)
    for parallel in (1, 3, 8):
        for type_name in kv.KV_TYPES:
            sizes = offload.model_sizes(info, kv.cells(1024, parallel), kv_types=(type_name, type_name))
            by_hand = _kv_bytes(1024 * parallel, 1, DEMO_EMBD, type_name)
            assert sizes.kv_bytes_per_layer == by_hand, (parallel, type_name)
    free = _free_for(_demo_sizes(demo_path, kv.cells(1024, 8), "q8_0"))
    fake.install(monkeypatch, fake.cuda(0, free, 24 * GiB), fake.cpu())
    with _serving(_options(demo_path, "q8_0", flash_attn="auto")) as server:
        assert server.state.service.engine.plan.full
        status, _, body = request(server, "POST", "/v1/completions", {"prompt": "대한민국은", "max_tokens": 4,
                                                                        "temperature": 0})
        assert status == 200 and body["choices"][0]["text"]
    with _serving(_options(demo_path, "f16")) as server:
        plan = server.state.service.engine.plan
        assert 0 < plan.n_gpu_layers <= plan.n_layer, plan


# --- recommend --------------------------------------------------------------------------------------------------


def _longest_by_hand(e: catalog.Entry, weights: str, free: int, type_name: str) -> int:
    """offload.py's full-offload rule solved for the context: what is left of the budget after the weights, the
    compute buffer (one 512-token batch) and the GPU context, over the K/V bytes of one token in every layer; in
    whole blocks of 256 tokens, at most 16 × the trained context."""
    compute = 512 * (e.vocab_rows + 4 * e.d_ff + 8 * e.d_model) * 4 + 64 * 2**20
    left = free * (1 - offload.SAFETY_FRACTION) - offload.DEVICE_CONTEXT_BYTES - compute - e.sizes[weights].gpu_weights
    per_token = e.layers * 2 * e.d_model * PER_VALUE[type_name]
    return max(0, min(16 * e.context, int(left // per_token) // 256 * 256))


@pytest.mark.parametrize("gb", (8, 12, 16, 24))
def test_longest_contexts_are_the_planners_boundary(gb):
    """Per catalog model on a card of `gb` GiB: q4_0 ≥ q8_0 ≥ f16; each context fits fully by offload.plan and 256
    more does not (unless it is the cap); and each equals the rule worked out by hand."""
    free = gb * GiB
    for e in catalog.load():
        p = recommend.pick(e, vram_bytes=free, ram_bytes=16 * GiB)
        lg = p.longest
        assert lg is not None and lg.type == (p.type or recommend.PARTIAL_TYPE) and lg.cap == 16 * e.context
        n = lg.tokens
        assert n["q4_0"] >= n["q8_0"] >= n["f16"], (e.name, n)
        for type_name, tokens in n.items():
            assert tokens % 256 == 0
            assert tokens == _longest_by_hand(e, lg.type, free, type_name), (e.name, gb, type_name)
            sizes = [recommend.planner_sizes(e, lg.type, ctx, (type_name, type_name)) for ctx in (tokens, tokens + 256)]
            assert tokens == 0 or offload.plan(sizes[0], free).full
            assert tokens == lg.cap or not offload.plan(sizes[1], free).full, (e.name, gb, type_name, tokens)


def test_longest_contexts_for_one_entry_written_out():
    """polyglot-ko-5.8b (28 layers, 4096 wide) as q8_0 on an 8 GiB card: the numbers the README quotes."""
    e = catalog.find("polyglot-ko-5.8b")
    p = recommend.pick(e, vram_bytes=8 * GiB, ram_bytes=16 * GiB)
    assert p.type == "q8_0"
    assert p.longest.tokens == {t: _longest_by_hand(e, "q8_0", 8 * GiB, t) for t in ("f16", "q8_0", "q4_0")}
    assert p.longest.tokens == {"f16": 2560, "q8_0": 5120, "q4_0": 9728}


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, text=True, timeout=120,
                          input=stdin)


def test_recommend_json_text_and_kv_cache_flag():
    proc = _run("recommend", "--vram", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kv_cache"] == "f16" and data["cpu_decode_at_depth"]["tok_s"] == {"f16": 14.8, "q8_0": 10.2}
    for m in data["models"]:
        e, lg = catalog.find(m["name"]), m["longest_context"]
        assert lg["tokens"] == {t: _longest_by_hand(e, lg["weights"], 12 * GiB, t) for t in kv.KV_TYPES}

    # --kv-cache q8_0 picks with a q8_0 cache: polyglot-ko-12.8b's best type on 12 GiB grows from q5_k_m to q6_k
    def pick(kv_cache: str) -> str:
        proc = _run("recommend", "--vram", "12", "--kv-cache", kv_cache, "--json")
        assert proc.returncode == 0, proc.stderr
        return next(m["type"] for m in json.loads(proc.stdout)["models"] if m["name"] == "polyglot-ko-12.8b")

    e = catalog.find("polyglot-ko-12.8b")
    compute = 512 * (e.vocab_rows + 4 * e.d_ff + 8 * e.d_model) * 4 + 64 * 2**20
    budget = 12 * GiB * (1 - offload.SAFETY_FRACTION) - offload.DEVICE_CONTEXT_BYTES - compute
    by_hand = {t: next(w for w in QUALITY_ORDER if e.sizes[w].gpu_weights + _kv_bytes(2048, e.layers, e.d_model, t)
                       <= budget) for t in ("f16", "q8_0")}
    assert by_hand == {"f16": "q5_k_m", "q8_0": "q6_k"} == {t: pick(t) for t in ("f16", "q8_0")}

    text = _run("recommend", "--vram", "8")
    assert text.returncode == 0, text.stderr
    assert "Longest context with every layer on the GPU" in text.stdout
    row = [line for line in text.stdout.splitlines() if line.startswith("polyglot-ko-5.8b ")][-1]  # the 2nd table
    assert row.split()[-3:] == ["2,560", "5,120", "9,728"]
    assert "saves memory, not time" in text.stderr and "q8_0 10.2 tok/s against f16's 14.8" in text.stderr
    cpu = _run("recommend", "--vram", "0", "--ram", "16")  # no GPU: the cost is said all the same
    assert cpu.returncode == 0 and "saves memory, not time" in cpu.stderr
    bad = _run("recommend", "--kv-cache", "int8")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert "kv_cache must be one of f16, q8_0, q4_0" in bad.stderr


# --- info, /show, serve's ready line ------------------------------------------------------------------------------


def test_info_counts_kv_at_the_chosen_types(demo_path):
    """The K/V bytes at the types asked, by hand; with --vram, q8_0 fits every layer where f16 does not."""
    for k, v in (("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")):
        mem = describe(demo_path, LoadOptions(ctx=1024, gpu_layers="0", kv_cache_k=k, kv_cache_v=v)).memory
        assert (mem.kv_cache_k, mem.kv_cache_v) == (k, v)
        by_hand = 1024 * DEMO_LAYERS * DEMO_EMBD * (PER_VALUE[k] + PER_VALUE[v])
        assert mem.kv_cpu == by_hand == kv.layer_bytes(1024, DEMO_EMBD, k, v) * DEMO_LAYERS
    free = _free_for(_demo_sizes(demo_path, 8192, "q8_0"))
    args = ("info", str(demo_path), "--ctx", "8192", "--vram", repr(free / GiB))
    q8, f16 = _run(*args, "--kv-cache", "q8_0", "--json"), _run(*args, "--json")
    assert q8.returncode == 0 and f16.returncode == 0, q8.stderr + f16.stderr
    q8m, f16m = json.loads(q8.stdout)["memory"], json.loads(f16.stdout)["memory"]
    assert (q8m["kv_cache_k"], q8m["kv_cache_v"], f16m["kv_cache_k"]) == ("q8_0", "q8_0", "f16")
    assert q8m["kv_gpu"] + q8m["kv_cpu"] == _kv_bytes(8192, DEMO_LAYERS, DEMO_EMBD, "q8_0")
    assert f16m["kv_gpu"] + f16m["kv_cpu"] == _kv_bytes(8192, DEMO_LAYERS, DEMO_EMBD, "f16")
    assert q8m["gpu_layers"] == DEMO_LAYERS + 1 > f16m["gpu_layers"]
    text = _run("info", str(demo_path), "--ctx", "1024", "--kv-cache", "q4_0")
    assert "KV cache (q4_0)" in text.stdout and "1.7 MiB" in text.stdout, text.stdout  # 6 × 1024 × 2 × 144 bytes
    mixed = _run("info", str(demo_path), "--kv-cache-k", "q8_0")
    assert "KV cache (K q8_0, V f16)" in mixed.stdout
    refused = _run("info", str(demo_path), "--kv-cache", "q8_0", "--flash-attn", "off")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "needs flash attention" in refused.stderr


def test_chat_show_names_the_kv_cache(demo_path):
    proc = _run("chat", "-m", str(demo_path), "--threads", "1", "-n", "2", "--kv-cache", "q8_0", stdin="안녕\n/show\n")
    assert proc.returncode == 0, proc.stderr
    # the demo's trained 1,024 tokens: 6 layers × 1,024 × 2 × 272 bytes = 3.19 MiB, as llama.cpp reported it
    assert "exchanges; KV cache q8_0, 3.2 MiB" in proc.stderr, proc.stderr


def test_serve_ready_line_names_the_kv_cache():
    pytest.importorskip("uvicorn")
    from test_cli_serve import start, wait_for

    proc = start("-m", "demo", "--kv-cache", "q4_0")
    try:
        # 1 slot of 256 tokens: 6 layers × 256 × 2 × 144 bytes = 0.42 MiB
        wait_for(proc, r"ready: malhae-demo-ko-f16, 1 slot of 256 tokens \(KV cache q4_0, 0\.42 MiB\)")
    finally:
        proc.kill()
        proc.wait(timeout=20)
