"""On a GPU with a GPU build (CUDA here; Metal, ROCm, Vulkan alike): automatic offload puts everything on the GPU and
computes what the CPU does."""

from __future__ import annotations

import numpy as np
import pytest

from malhae.convert import pipeline
from malhae.runtime import devices
from malhae.runtime.engine import Engine
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.store import models

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_path(k_quant_checkpoint, tmp_path_factory):
    return pipeline.convert(k_quant_checkpoint, "q8_0", tmp_path_factory.mktemp("gpu") / "m.gguf").path


def test_auto_offloads_every_layer(model_path):
    with Engine(LoadOptions(model=model_path, ctx=256)) as e:
        assert e.plan.full and e.n_gpu_layers == e.plan.n_layer + 1
        assert e.plan.devices and all(d.offloads for d in e.plan.devices) and e.plan.load_devices
        _, stats = e.complete("대한민국의 주권은", Sampling(temperature=0, max_tokens=32, ignore_eos=True))
        assert stats.generated_tokens == 32 and stats.decode_tps > 0


def test_gpu_logits_match_cpu(model_path):
    with Model(model_path) as m:
        tokens = m.tokenize("대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.")
        with Context(m, LoadOptions(ctx=128)) as ctx:
            cpu = ctx.logits(tokens)
    with Model(model_path, n_gpu_layers=99) as m, Context(m, LoadOptions(ctx=128)) as ctx:
        gpu = ctx.logits(tokens)
    scale = max(1.0, float(np.abs(cpu).max()))
    assert float(np.abs(cpu - gpu).max()) <= 2e-2 * scale


@pytest.mark.skipif(models.demo_model() is None, reason="the bundled demo model is not built")
def test_demo_greedy_is_the_same_on_gpu_and_cpu():
    greedy = Sampling(temperature=0, max_tokens=40)
    with Engine(LoadOptions(model=models.demo_model(), gpu_layers=0)) as cpu:
        cpu_text, _ = cpu.complete("대한민국의 주권은", greedy)
    with Engine(LoadOptions(model=models.demo_model())) as gpu:
        assert gpu.n_gpu_layers > 0
        gpu_text, _ = gpu.complete("대한민국의 주권은", greedy)
    assert gpu_text == cpu_text


def test_imatrix_on_the_gpu_matches_the_cpu():
    """The activations come out of device memory (ggml_backend_tensor_get) when the model is offloaded; the sums must
    be the CPU's within llama.cpp's GPU rounding."""
    from malhae.convert import corpus, importance

    demo = models.demo_model()
    if demo is None:
        pytest.skip("the bundled demo model is not built")
    text = corpus.calibration_text()[1]
    with Model(demo) as m:
        cpu, _, _ = importance.compute(m, text, importance.chunk_layout(128), LoadOptions(threads=2), chunks=16)
    with Model(demo, n_gpu_layers=99) as m:
        gpu, _, _ = importance.compute(m, text, importance.chunk_layout(128), LoadOptions(threads=2), chunks=16)
    assert sorted(gpu.sums) == sorted(cpu.sums)
    for name, sums in cpu.sums.items():
        assert gpu.counts[name].tolist() == cpu.counts[name].tolist()
        assert float(np.abs(gpu.sums[name] - sums).max() / np.abs(sums).max()) < 1e-2, name


def test_ggml_reports_the_gpu_nvml_reports():
    """The ctypes binding against a real GPU: ggml's CUDA device is NVML's GPU, with about its memory."""
    from malhae.runtime import hardware

    gpus = hardware.nvidia_gpus()
    if not gpus:
        pytest.skip("NVML (nvidia-ml-py) sees no NVIDIA GPU here")
    cuda = [d for d in devices.listed() if d.backend == "CUDA"]
    assert len(cuda) == len(gpus)
    for d, g in zip(cuda, gpus, strict=True):
        assert d.kind == "gpu" and (g.name in d.description or d.description in g.name)
        assert abs(d.total - g.total) <= 0.02 * g.total and 0 < d.free <= d.total


@pytest.mark.skipif(models.demo_model() is None, reason="the bundled demo model is not built")
def test_device_cpu_keeps_the_gpu_out():
    """--device cpu: no layer and no large batch on the GPU (an empty device list), the same greedy text."""
    greedy = Sampling(temperature=0, max_tokens=40)
    with Engine(LoadOptions(model=models.demo_model(), device="cpu")) as cpu:
        assert cpu.plan.load_devices == () and cpu.n_gpu_layers == 0 and cpu.plan.cpu_only
        cpu_text, _ = cpu.complete("대한민국의 주권은", greedy)
    name = next(d.name for d in devices.listed() if d.offloads)
    with Engine(LoadOptions(model=models.demo_model(), device=name)) as gpu:
        assert gpu.plan.full and [d.name for d in gpu.plan.devices] == [name]
        gpu_text, _ = gpu.complete("대한민국의 주권은", greedy)
    assert gpu_text == cpu_text
