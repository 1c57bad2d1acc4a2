"""The GPU layer planner: a pure function of real GGUF tensor tables and (here, fake) free VRAM."""

from __future__ import annotations

import pytest

from malhae.convert import pipeline
from malhae.errors import UserError
from malhae.runtime import offload
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions
from malhae.runtime.windows import Layout
from malhae.store import models

GiB = 2**30


@pytest.fixture(scope="module")
def sizes(k_quant_checkpoint, tmp_path_factory):
    path = pipeline.convert(k_quant_checkpoint, "q4_k_m", tmp_path_factory.mktemp("off") / "m.gguf").path
    return offload.model_sizes(read_info(path), n_cells=2048)


def test_sizes_come_from_the_tensor_table(sizes, k_quant_checkpoint):
    info_layers = [b for b in sizes.layer_bytes]
    assert len(info_layers) == 2 and all(b > 0 for b in info_layers)
    assert sizes.output_bytes > 0
    assert sizes.kv_bytes_per_layer == 2 * 2048 * 256 * 2  # K and V, 2048 positions, n_embd 256, f16


def test_no_gpu_means_cpu(sizes):
    assert offload.plan(sizes, None).n_gpu_layers == 0
    assert offload.plan(sizes, 0).n_gpu_layers == 0


def test_everything_fits_on_a_big_gpu(sizes):
    p = offload.plan(sizes, 80 * GiB)
    assert p.full and p.n_gpu_layers == sizes.n_layer + 1


def test_partial_offload_is_the_most_that_fits():
    layer, kv = 300 * 2**20, 50 * 2**20
    s = offload.ModelSizes(n_layer=24, layer_bytes=[layer] * 24, output_bytes=200 * 2**20, kv_bytes_per_layer=kv,
                           compute_bytes=500 * 2**20)
    for free in (1 * GiB, 2 * GiB, 4 * GiB, 6 * GiB, 8 * GiB):
        p = offload.plan(s, free)
        budget = free * (1 - offload.SAFETY_FRACTION) - offload.DEVICE_CONTEXT_BYTES - s.compute_bytes
        if p.full:
            assert s.total - s.compute_bytes <= budget
            continue
        # llama.cpp's n_gpu_layers = k is the output layer and k - 1 repeating layers (i_gpu_start, llama-model.cpp)
        output = 200 * 2**20
        assert output + (p.n_gpu_layers - 1) * (layer + kv) <= budget  # what it chose fits ...
        assert output + p.n_gpu_layers * (layer + kv) > budget  # ... and one more layer would not
    layers = [offload.plan(s, free).n_gpu_layers for free in range(0, 12 * GiB, GiB // 2)]
    assert layers == sorted(layers) and layers[0] == 0 and layers[-1] == 25  # more memory never means fewer layers


def test_a_gpu_too_small_for_the_overhead_gets_nothing():
    s = offload.ModelSizes(4, [10**8] * 4, 10**7, 10**6, 10**9)
    assert offload.plan(s, 1 * GiB).n_gpu_layers == 0


# --- one choice for every command -------------------------------------------------------------------------------

DEMO = models.demo_model()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A 24 GB NVIDIA GPU with 20 GB free, as a CUDA build's ggml lists it (tests/fake_devices.py); llama.cpp itself
    stays real. Records the n_gpu_layers every model load is given."""
    import fake_devices as fake

    loads = fake.install(monkeypatch, fake.cuda(0, 20 * GiB, 24 * GiB), fake.cpu())

    class Layers(list):
        def clear(self):
            loads.calls.clear()

        def __eq__(self, other):
            return loads.layers == other

        def __bool__(self):
            return bool(loads.layers)

        def __getitem__(self, i):
            return loads.layers[i]

    return Layers()


@pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")
def test_every_command_offloads_by_the_same_rule(fake_gpu, tmp_path):
    """chat/ask/complete/bench (the engine), info, eval ppl, eval compare and eval kobest all ask offload.choose: on
    a 24 GB GPU the 8.6M demo goes entirely on it (its 2 layers + the output layer). Before the one rule, eval kobest
    passed its notify callback where the planner wanted a layout and died on this machine with an internal error."""
    from malhae.eval import compare, perplexity
    from malhae.eval.kobest import data, evaluate
    from malhae.eval.kobest.tasks import select
    from malhae.runtime.engine import Engine
    from malhae.store.info import describe

    everything = read_info(DEMO).arch_int("block_count") + 1
    with Engine(LoadOptions(model=DEMO, ctx=64)) as engine:
        assert engine.n_gpu_layers == everything and engine.plan.mode == "auto"
    assert describe(DEMO).memory.gpu_layers == everything
    text = tmp_path / "t.txt"
    text.write_text("대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 "
                    "나온다. " * 20, encoding="utf-8")
    perplexity.run(LoadOptions(model=DEMO, gpu_layers="auto"), text, Layout.of(64))
    compare.run(DEMO, DEMO, text, Layout.of(64), LoadOptions(gpu_layers="auto"))
    report = evaluate.evaluate(LoadOptions(model=DEMO, gpu_layers="auto"), data.source(None, False), select("copa"),
                               [0], limit=2)
    assert report.cells[0].n == 2
    assert fake_gpu == [everything] * 5  # engine, ppl, compare A and B, kobest
    fake_gpu.clear()
    perplexity.run(LoadOptions(model=DEMO, gpu_layers="1"), text, Layout.of(64))
    perplexity.run(LoadOptions(model=DEMO, gpu_layers=0), text, Layout.of(64))
    assert fake_gpu == [1, 0]


@pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")
def test_eval_kobest_with_auto_offload_through_the_cli(fake_gpu, capsys):
    from malhae.cli import main

    assert main(["eval", "kobest", str(DEMO), "--tasks", "copa", "--shots", "0", "--limit", "2", "--json"]) == 0
    assert fake_gpu and fake_gpu[0] > 0 and '"task": "copa"' in capsys.readouterr().out


def test_cpu_only_build_says_how_to_get_cuda_once(monkeypatch):
    """A CPU-only build (ggml lists the CPU alone) on a machine with an NVIDIA GPU: said once per process, however
    many models load (a chat's /model, a draft model), and not at all for --gpu-layers 0."""
    import fake_devices as fake

    from malhae.runtime import hardware

    nvidia = hardware.Facts("Linux", "x86_64", False, ("NVIDIA GeForce RTX 3060",), False)
    fake.install(monkeypatch, fake.cpu(), facts=nvidia)
    info = read_info(DEMO) if DEMO else None
    if info is None:
        pytest.skip("the bundled demo model is not built")
    said: list[str] = []
    assert offload.choose(info, LoadOptions(gpu_layers=0, ctx=256), notify=said.append).n_gpu_layers == 0 and not said
    for asked in ("auto", 12, "auto"):
        plan = offload.choose(info, LoadOptions(gpu_layers=asked, ctx=256), notify=said.append)
        assert plan.n_gpu_layers == 0
    assert len(said) == 1 and hardware.CUDA_INSTALL_HINT in said[0] and "RTX 3060" in said[0]


def test_what_if_plans_only_the_automatic_offload():
    info = read_info(DEMO) if DEMO else None
    if info is None:
        pytest.skip("the bundled demo model is not built")
    plan = offload.choose(info, LoadOptions(gpu_layers="auto", ctx=256), vram=8 * GiB)
    assert plan.mode == "what-if" and plan.full and plan.free_bytes == 8 * GiB
    assert offload.choose(info, LoadOptions(gpu_layers="auto", ctx=256), vram=0).n_gpu_layers == 0
    with pytest.raises(UserError, match="either --vram or --gpu-layers"):
        offload.choose(info, LoadOptions(gpu_layers=3, ctx=256), vram=8 * GiB)
