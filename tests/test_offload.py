"""The GPU layer planner: a pure function of real GGUF tensor tables and (here, fake) free VRAM."""

from __future__ import annotations

import pytest

from app import offload
from app.gguf_info import read_info
from convert import pipeline

GiB = 2**30


@pytest.fixture(scope="module")
def sizes(k_quant_checkpoint, tmp_path_factory):
    path = pipeline.convert(k_quant_checkpoint, "q4_k_m", tmp_path_factory.mktemp("off") / "m.gguf").path
    return offload.model_sizes(read_info(path), n_ctx=2048)


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
        budget = free * (1 - offload.SAFETY_FRACTION) - offload.CUDA_CONTEXT_BYTES - s.compute_bytes
        if p.full:
            assert s.total - s.compute_bytes <= budget
            continue
        assert p.n_gpu_layers * (layer + kv) <= budget  # what it chose fits ...
        assert (p.n_gpu_layers + 1) * (layer + kv) > budget  # ... and one more layer would not
    layers = [offload.plan(s, free).n_gpu_layers for free in range(0, 12 * GiB, GiB // 2)]
    assert layers == sorted(layers) and layers[0] == 0 and layers[-1] == 25  # more memory never means fewer layers


def test_a_gpu_too_small_for_the_overhead_gets_nothing():
    s = offload.ModelSizes(4, [10**8] * 4, 10**7, 10**6, 10**9)
    assert offload.plan(s, 1 * GiB).n_gpu_layers == 0
