"""GPU offload on every backend: ggml's device list (real here: one CPU), the planner on the device lists of machines
this runner is not (CUDA, two GPUs, Metal, a Vulkan iGPU), the same plan through `info`, `bench`, the engine's load
and the chat's banner, and the install hint per platform."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace

import fake_devices as fake
import pytest

from malhae.cli import main
from malhae.errors import UserError
from malhae.runtime import devices, ggml, hardware, llama, offload
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.store import catalog, models, recommend

GiB = 2**30
DEMO = models.demo_model()
needs_demo = pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not built")


def sizes(name: str, type_name: str = "q4_k_m") -> offload.ModelSizes:
    """The planner's figures for a catalog model at its full context, from the catalog's computed tensor sizes."""
    entry = next(e for e in catalog.load() if e.name == name)
    return recommend.planner_sizes(entry, type_name)


def budget(s: offload.ModelSizes, free: int) -> float:
    """What one GPU can hold beside its context and compute buffer (offload.py's rule, written out)."""
    return free * (1 - offload.SAFETY_FRACTION) - offload.DEVICE_CONTEXT_BYTES - s.compute_bytes


def everything(s: offload.ModelSizes) -> int:
    return sum(s.layer_bytes) + s.output_bytes + s.kv_bytes_per_layer * s.n_layer


class Shape:
    """Stands for a GGUF's header where offload.choose only needs the layer count: offload.model_sizes is then
    replaced to answer with the catalog's figures (`planned_as`)."""

    def __init__(self, s: offload.ModelSizes) -> None:
        self.sizes = s

    def arch_int(self, key: str) -> int | None:
        return self.sizes.n_layer if key.endswith("block_count") else None


def planned_as(monkeypatch, name: str, type_name: str = "q4_k_m") -> Shape:
    monkeypatch.setattr(offload, "model_sizes", lambda info, n_cells, n_batch=512, kv_types=("f16", "f16"), loras=():
                        info.sizes)
    return Shape(sizes(name, type_name))


# --- the binding, against the real ggml ---------------------------------------------------------------------------

def test_ggml_lists_this_machines_cpu_with_its_memory():
    listed = devices.listed()
    cpu = [d for d in listed if d.kind == "cpu"]
    assert len(cpu) == 1 and cpu[0].backend == "CPU" and cpu[0].name == "CPU" and cpu[0].description
    # ggml's CPU backend reports physical RAM as both free and total (sysconf), as the OS does
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cpu[0].total == ram and 0 < cpu[0].free <= cpu[0].total
    assert [d.index for d in listed] == list(range(ggml.device_count()))
    # llama.cpp's own answer agrees with the list: this build offloads iff ggml has a GPU device
    assert hardware.llama_supports_gpu() == any(d.offloads for d in listed)


@needs_demo
def test_devices_and_split_reach_llama_cpp():
    """The params are set through ctypes on the real library: an empty device list (--device cpu) and a tensor
    split load and compute exactly what the default load computes."""
    texts = []
    for where in ({}, {"devices": (), "tensor_split": (2.0, 1.0)}, {"devices": None, "n_gpu_layers": 99}):
        with llama.Model(DEMO, **where) as model, llama.Context(model, LoadOptions(ctx=64, batch=64, threads=1)) as ctx:
            texts.append(ctx.greedy(model.tokenize("대한민국의 주권은"), 8))
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 8


# --- the planner on machines this runner is not ---------------------------------------------------------------------

def test_cuda_8gb():
    gpu = fake.cuda(0, int(7.5 * GiB), 8 * GiB, "NVIDIA GeForce RTX 3070")
    small = offload.plan(sizes("polyglot-ko-5.8b"), [gpu], ram=fake.RAM)
    assert small.full and small.devices == (gpu,) and small.split is None and small.reason == "all layers fit"
    big = sizes("polyglot-ko-12.8b")
    p = offload.plan(big, [gpu], ram=fake.RAM)
    # by hand: the output layer, then the last layers (q4_k_m mixes q4_k and q6_k ones), each with its KV cache,
    # while the budget holds them
    room, by_hand = budget(big, gpu.free) - big.output_bytes, 1
    for layer in reversed(big.layer_bytes):
        if layer + big.kv_bytes_per_layer > room:
            break
        room -= layer + big.kv_bytes_per_layer
        by_hand += 1
    assert p.n_gpu_layers == by_hand == 28
    assert not p.full and p.where == "28 of 41 layers on CUDA0 (NVIDIA GeForce RTX 3070)"


def test_two_gpus_hold_what_neither_holds_alone():
    """12.8b in f16 (25.6 GB) on 24 GB + 12 GB: all of it, split in proportion to what each has left."""
    a, b = fake.cuda(0, 23 * GiB, 24 * GiB), fake.cuda(1, 11 * GiB, 12 * GiB, "NVIDIA GeForce RTX 3060")
    s = sizes("polyglot-ko-12.8b", "f16")
    assert not offload.plan(s, [a], ram=fake.RAM).full
    p = offload.plan(s, [a, b], ram=fake.RAM)
    assert p.full and p.devices == (a, b) and sum(p.layers) == s.n_layer + 1
    assert p.split == tuple(float(n) for n in p.layers)
    left = [budget(s, a.free), budget(s, b.free)]
    assert abs(p.layers[0] / sum(p.layers) - left[0] / sum(left)) <= 1 / sum(p.layers)
    # each GPU's share fits it: the first takes the first layers of the offloaded range, the last the output layer
    per_layer = s.layer_bytes[0] + s.kv_bytes_per_layer
    assert p.layers[0] * per_layer <= left[0]
    assert (p.layers[1] - 1) * per_layer + s.output_bytes <= left[1]
    assert "in proportion to free memory" in p.reason and p.where.startswith("all layers on CUDA0 + CUDA1 (")


def test_two_gpus_too_small_for_everything_are_both_filled():
    a, b = fake.cuda(0, 10 * GiB), fake.cuda(1, 6 * GiB)
    s = sizes("polyglot-ko-12.8b", "f16")
    p = offload.plan(s, [a, b], ram=fake.RAM)
    per_layer = s.layer_bytes[0] + s.kv_bytes_per_layer
    room = int(budget(s, a.free) // per_layer) + int((budget(s, b.free) - s.output_bytes) // per_layer)
    assert not p.full and p.n_gpu_layers == room + 1 and len(p.devices) == 2


def test_metal_16gb_unified_memory():
    """An M2 Pro with 16 GB: ggml-metal reports the recommended working set (about 2/3 of RAM)."""
    ram = 16 * GiB
    gpu = fake.metal(int(ram * 2 / 3))
    assert gpu.unified and gpu.platform == "Metal"
    p = offload.plan(sizes("polyglot-ko-5.8b"), [gpu], ram=ram)
    assert p.full and p.device_free == (gpu.free,)
    # a raised wired limit (iogpu.wired_limit_mb) reports nearly all RAM: the system keeps its fifth
    raised = fake.metal(ram - GiB // 2)
    assert devices.usable(raised, ram) == ram - int(ram * devices.SYSTEM_RESERVE_FRACTION)
    assert offload.plan(sizes("polyglot-ko-12.8b"), [raised], ram=ram).device_free == (ram - int(ram * 0.2),)


def test_vulkan_igpu_2gb(monkeypatch):
    """An integrated GPU shares the CPU's memory: auto uses it only when the whole model fits."""
    igpu = fake.vulkan_igpu(2 * GiB)
    fake.install(monkeypatch, fake.cpu(16 * GiB), igpu)
    small, large = planned_as(monkeypatch, "polyglot-ko-1.3b"), planned_as(monkeypatch, "polyglot-ko-3.8b")
    assert everything(small.sizes) <= budget(small.sizes, 2 * GiB) < everything(large.sizes)
    fits = offload.choose(small, LoadOptions(gpu_layers="auto", ctx=2048))
    assert fits.full and fits.devices == (igpu,) and "integrated" in fits.reason
    said: list[str] = []
    cpu = offload.choose(large, LoadOptions(gpu_layers="auto", ctx=2048), notify=said.append)
    assert cpu.n_gpu_layers == 0 and "integrated GPU Vulkan0" in cpu.reason and "--device Vulkan0" in cpu.reason
    assert said == [cpu.reason]  # said, not only shown by `malhae info`
    forced = offload.choose(large, LoadOptions(gpu_layers="auto", ctx=2048, device="Vulkan0"))
    assert 0 < forced.n_gpu_layers <= large.sizes.n_layer and forced.devices == (igpu,)


def test_nothing_fits():
    s = sizes("polyglot-ko-12.8b")
    p = offload.plan(s, [fake.cuda(0, 512 * 2**20)], ram=fake.RAM)
    assert p.n_gpu_layers == 0 and p.load_devices is None and p.where == "CPU"
    assert p.reason == "0 of 41 layers fit in 512.0 MiB free"


def test_exactly_fits_with_the_kv_cache():
    """Free memory at the byte where weights, the whole context's KV cache and the buffers just fit."""
    s = sizes("polyglot-ko-1.3b")
    need = everything(s) + offload.DEVICE_CONTEXT_BYTES + s.compute_bytes
    free = -(-need * 100 // 95)  # the least free memory whose 95 % holds it
    assert offload.plan(s, [fake.cuda(0, free)], ram=fake.RAM).full
    short = offload.plan(s, [fake.cuda(0, free - 2)], ram=fake.RAM)
    assert not short.full and short.n_gpu_layers == s.n_layer  # one layer, with its KV cache, stays on the CPU


def test_asked_layers_are_split_over_the_gpus(monkeypatch):
    fake.install(monkeypatch, fake.cuda(0, 20 * GiB), fake.cuda(1, 10 * GiB), fake.cpu())
    info = planned_as(monkeypatch, "polyglot-ko-12.8b")
    p = offload.choose(info, LoadOptions(gpu_layers=12, ctx=2048))
    assert p.mode == "asked" and p.n_gpu_layers == 12 and p.layers == (8, 4) and p.split == (8.0, 4.0)
    one = offload.choose(info, LoadOptions(gpu_layers="auto", ctx=2048, device="1"))
    assert [d.name for d in one.devices] == ["CUDA1"] and one.split is None
    both = offload.choose(info, LoadOptions(gpu_layers="auto", ctx=2048, device="cuda1,CUDA0"))
    assert [d.name for d in both.devices] == ["CUDA1", "CUDA0"]
    cpu = offload.choose(info, LoadOptions(gpu_layers="auto", ctx=2048, device="cpu"))
    assert cpu.n_gpu_layers == 0 and cpu.load_devices == ()
    for bad, words in (("CUDA7", "0 = CUDA0"), ("3", "1 = CUDA1"), ("CUDA0,cuda0", "CUDA0 twice")):
        with pytest.raises(UserError, match=words):
            offload.choose(info, LoadOptions(gpu_layers="auto", ctx=2048, device=bad))


def test_a_failed_load_retries_with_fewer_layers_on_the_same_split():
    p = offload.plan(sizes("polyglot-ko-12.8b", "f16"), [fake.cuda(0, 23 * GiB), fake.cuda(1, 11 * GiB)],
                     ram=fake.RAM)
    less = offload.fewer(p, p.n_gpu_layers * 3 // 4)
    assert less.devices == p.devices and sum(less.layers) == less.n_gpu_layers == p.n_gpu_layers * 3 // 4
    assert abs(less.layers[0] / sum(less.layers) - p.layers[0] / sum(p.layers)) < 0.05


# --- the same plan everywhere -----------------------------------------------------------------------------------------

@needs_demo
def test_engine_loads_with_the_plans_layers_devices_and_split(monkeypatch):
    a, b = fake.cuda(0, 20 * GiB), fake.cuda(1, 10 * GiB, 12 * GiB, "NVIDIA GeForce RTX 3060")
    loads = fake.install(monkeypatch, a, b, fake.cpu())
    from malhae.runtime.engine import Engine

    with Engine(LoadOptions(model=DEMO, ctx=64)) as engine:
        plan = engine.plan
        out = engine.complete("대한민국은", Sampling(temperature=0, max_tokens=4))
    n_layer = read_info(DEMO).arch_int("block_count")
    assert plan.full and plan.devices == (a, b) and sum(plan.layers) == n_layer + 1
    assert loads.calls == [{"n_gpu_layers": n_layer + 1, "devices": (a.index, b.index),
                            "tensor_split": list(plan.split)}]
    assert out and engine.where == f"{DEMO.name}, all layers on CUDA0 + CUDA1"
    assert f"all layers on CUDA0 + CUDA1 ({plan.layers[0]} + {plan.layers[1]})" in engine.location


@needs_demo
def test_info_json_shows_the_devices_and_the_split(monkeypatch, capsys):
    fake.install(monkeypatch, fake.cuda(0, 20 * GiB), fake.cuda(1, 10 * GiB), fake.cpu())
    assert main(["info", str(DEMO), "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    n_layer = read_info(DEMO).arch_int("block_count")
    assert memory["gpu_layers"] == n_layer + 1 and memory["gpu_buffers"] == 2
    assert [d["name"] for d in memory["devices"]] == ["CUDA0", "CUDA1", "CPU"]
    assert [s["name"] for s in memory["split"]] == ["CUDA0", "CUDA1"]
    assert sum(s["layers"] for s in memory["split"]) == n_layer + 1
    assert memory["vram"] == sum(s["bytes"] for s in memory["split"])
    assert memory["device_context"] == 2 * offload.DEVICE_CONTEXT_BYTES
    assert main(["info", str(DEMO), "--device", "CUDA1"]) == 0
    text = capsys.readouterr().out
    assert "devices (as llama.cpp sees them): CUDA0 NVIDIA GeForce RTX 4090 (CUDA, 20.00 GiB of 20.00 GiB" in text
    assert "all layers on CUDA1 (NVIDIA GeForce RTX 4090)" in text


@needs_demo
def test_info_on_a_mac_and_without_a_gpu_build(monkeypatch, capsys):
    fake.install(monkeypatch, fake.metal(int(10.67 * GiB)), fake.cpu(16 * GiB), ram=16 * GiB)
    assert main(["info", str(DEMO)]) == 0
    text = capsys.readouterr().out
    assert "MTL0 Apple M2 Pro (Metal, unified memory" in text and "all layers on MTL0 (Apple M2 Pro)" in text
    mac = hardware.Facts("Darwin", "arm64", False, (), False)
    fake.install(monkeypatch, fake.cpu(16 * GiB), facts=mac)
    assert main(["info", str(DEMO)]) == 0
    captured = capsys.readouterr()
    assert "CPU only" in captured.out and hardware.METAL_INSTALL_HINT in captured.err


@needs_demo
def test_bench_runs_where_it_was_told(monkeypatch, capsys):
    loads = fake.install(monkeypatch, fake.cuda(0, 20 * GiB), fake.cuda(1, 10 * GiB), fake.cpu())
    assert main(["bench", str(DEMO), "-p", "16", "-n", "4", "-r", "1", "--device", "CUDA1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["devices"] == ["CUDA1"] and result["where"].startswith("all layers on CUDA1")
    assert loads.calls[0]["devices"] == (2,) and loads.calls[0]["tensor_split"] is None
    assert main(["bench", str(DEMO), "--device", "CUDA2"]) == 2
    assert "device 'CUDA2' (--device, or the settings file's device): no such device" in capsys.readouterr().err


@needs_demo
def test_llama_bench_gets_the_same_devices_and_split(tmp_path):
    """The command line given to llama-bench, read back by a stand-in that prints what llama-bench prints."""
    from malhae.eval import upstream

    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n"
                      "echo '[{\"n_prompt\": 16, \"n_gen\": 0, \"avg_ts\": 1.0}, "
                      "{\"n_prompt\": 0, \"n_gen\": 4, \"avg_ts\": 2.0}]'\n")
    script.chmod(0o755)
    p = offload.plan(sizes("polyglot-ko-12.8b", "f16"), [fake.cuda(0, 23 * GiB), fake.cuda(1, 11 * GiB)],
                     ram=fake.RAM)
    options, test = LoadOptions(model=DEMO, threads=2), upstream.BenchTest(16, 4)
    assert upstream.run_llama_bench(script, options, p, test) == (1.0, 2.0)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-ngl") + 1] == str(p.n_gpu_layers) and args[args.index("-dev") + 1] == "CUDA0/CUDA1"
    assert args[args.index("-ts") + 1] == f"{p.layers[0]}/{p.layers[1]}"
    upstream.run_llama_bench(script, options, replace(p, cpu_only=True, n_gpu_layers=0), test)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-dev") + 1] == "none"


@needs_demo
def test_chat_banner_says_where_the_model_runs(monkeypatch):
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from malhae.chat import reader
    from malhae.chat import session as chat_session

    fake.install(monkeypatch, fake.cuda(0, 20 * GiB), fake.cpu())
    err = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("/show\r")
        pipe.close()
        session = chat_session.open_chat(LoadOptions(threads=1), model=str(DEMO), resolve=models.resolve,
                                 reader=reader.PromptReader(InMemoryHistory(), input=pipe, output=DummyOutput()),
                                 out=io.StringIO(), console=Console(file=err, width=200),
                                 sampling=Sampling(max_tokens=4, seed=1))
        session.run()
    text = err.getvalue()
    assert "all layers on CUDA0)" in text and "all layers on CUDA0 (NVIDIA GeForce RTX 4090)" in text


def test_recommend_plans_for_the_devices_ggml_reports(monkeypatch):
    fake.install(monkeypatch, fake.metal(int(10.67 * GiB)), fake.cpu(16 * GiB), ram=16 * GiB)
    m = recommend.machine()
    assert m.gpu_names == ("MTL0 (Apple M2 Pro)",) and m.vram_bytes == int(10.67 * GiB) and m.hint is None
    entry = next(e for e in catalog.load() if e.name == "polyglot-ko-5.8b")
    assert recommend.pick(entry, vram_bytes=m.vram_bytes, ram_bytes=m.ram_bytes, gpus=m.gpus).where == "gpu"
    # a 2 GB iGPU too small for 5.8b: RAM, as --gpu-layers auto would run it
    fake.install(monkeypatch, fake.cpu(16 * GiB), fake.vulkan_igpu(2 * GiB), ram=16 * GiB)
    m = recommend.machine()
    assert recommend.pick(entry, vram_bytes=m.vram_bytes, ram_bytes=m.ram_bytes, gpus=m.gpus).where == "ram"
    nvidia = hardware.Facts("Linux", "x86_64", False, ("NVIDIA GeForce RTX 4090",), False)
    fake.install(monkeypatch, fake.cpu(), facts=nvidia)
    assert hardware.CUDA_INSTALL_HINT in recommend.machine().hint


# --- the install hint, per platform ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("facts", "words"), [
    (hardware.Facts("Linux", "x86_64", False, ("NVIDIA GeForce RTX 4090",), False),
     ["NVIDIA GPU (NVIDIA GeForce RTX 4090)", hardware.CUDA_INSTALL_HINT]),
    (hardware.Facts("Windows", "AMD64", False, ("NVIDIA GPU",), False), ["without CUDA", "-DGGML_CUDA=on"]),
    (hardware.Facts("Linux", "x86_64", False, (), True), ["AMD GPU", "-DGGML_HIP=on", "-DGGML_VULKAN=on"]),
    (hardware.Facts("Darwin", "arm64", False, (), False), ["Apple Silicon", hardware.METAL_INSTALL_HINT]),
    (hardware.Facts("Darwin", "x86_64", True, (), False), ["Rosetta", "arm64 Python"]),
])
def test_install_hint_per_platform(facts, words):
    hint = hardware.install_hint(facts)
    assert hint and "\n" not in hint and all(w in hint for w in words), hint


def test_no_hint_where_there_is_nothing_to_install():
    for facts in (fake.NO_GPU, hardware.Facts("Darwin", "x86_64", False, (), False)):  # an Intel Mac
        assert hardware.install_hint(facts) is None


def test_gpus_are_found_in_sysfs_without_nvml(tmp_path, monkeypatch):
    for card, vendor in (("card0", "0x1002"), ("card1", "0x10de"), ("card1-DP-1", None), ("renderD128", None)):
        (tmp_path / card / "device").mkdir(parents=True)
        if vendor:
            (tmp_path / card / "device" / "vendor").write_text(vendor + "\n")
    assert hardware.drm_vendors(tmp_path) == ["0x1002", "0x10de"]
    monkeypatch.setattr(hardware, "DRM", tmp_path)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hardware, "nvidia_gpus", lambda: ())
    facts = hardware.facts.__wrapped__()
    assert facts.nvidia == ("NVIDIA GPU",) and facts.amd
    assert hardware.drm_vendors(tmp_path / "missing") == []


def test_a_gpu_build_never_hints(monkeypatch):
    nvidia = hardware.Facts("Linux", "x86_64", False, ("NVIDIA GeForce RTX 4090",), False)
    fake.install(monkeypatch, fake.cuda(0, 20 * GiB), fake.cpu(), facts=nvidia)
    info = planned_as(monkeypatch, "polyglot-ko-1.3b")
    said: list[str] = []
    assert offload.choose(info, LoadOptions(gpu_layers="auto", ctx=2048), notify=said.append).full and said == []


@needs_demo
def test_a_device_in_the_settings_file_is_checked_like_the_flag(tmp_path, monkeypatch, capsys):
    settings = tmp_path / "config.toml"
    settings.write_text('device = "CUDA5"\n', encoding="utf-8")
    monkeypatch.setenv("MALHAE_CONFIG", str(settings))
    assert main(["ask", "안녕", "-n", "2", "--model", str(DEMO)]) == 2
    err = capsys.readouterr().err
    assert "device 'CUDA5' (--device, or the settings file's device)" in err and "Traceback" not in err
    assert main(["ask", "안녕", "-n", "2", "--model", str(DEMO), "--device", "cpu"]) == 0  # the flag wins


@needs_demo
def test_a_split_is_said_once(monkeypatch):
    fake.install(monkeypatch, fake.cuda(0, 20 * GiB), fake.cuda(1, 10 * GiB), fake.cpu())
    from malhae.runtime.engine import Engine

    said: list[str] = []
    for _ in range(2):
        with Engine(LoadOptions(model=DEMO, ctx=64), notify=said.append) as engine:
            layers = engine.plan.layers
    assert said == [f"all layers on CUDA0 + CUDA1 ({layers[0]} + {layers[1]}): split over 2 GPUs in proportion to "
                    "free memory (20.00 GiB + 10.00 GiB free)"]


@needs_demo
def test_what_if_and_a_device_do_not_mix(capsys):
    assert main(["info", str(DEMO), "--vram", "8", "--device", "CUDA0"]) == 2
    assert "--vram plans for a GPU that is not here; leave out --device" in capsys.readouterr().err
    assert main(["info", str(DEMO), "--vram", "8", "--device", "auto"]) == 0
