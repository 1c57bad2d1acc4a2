"""The engine's mechanics on a converted test model: sampling, stops, context limits, KV reuse, UTF-8 safety."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from malhae.convert import pipeline
from malhae.errors import UserError
from malhae.runtime.engine import Engine, check_model_file
from malhae.runtime.settings import LoadOptions, Sampling
from malhae.store import models

PROMPT = "대한민국의 주권은 국민에게 있고, 모든 권력은"


@pytest.fixture(scope="module")
def model_path(k_quant_checkpoint, tmp_path_factory) -> Path:
    return pipeline.convert(k_quant_checkpoint, "f16", tmp_path_factory.mktemp("eng") / "m.gguf").path


@pytest.fixture(scope="module")
def engine(model_path):
    with Engine(LoadOptions(model=model_path, ctx=256, gpu_layers=0)) as e:
        yield e


GREEDY = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=24, ignore_eos=True)


def test_greedy_is_deterministic_and_matches_argmax(engine, model_path):
    first, _ = engine.complete(PROMPT, GREEDY)
    ids = list(engine.generated)
    engine.cache = []
    second, _ = engine.complete(PROMPT, GREEDY)
    assert first == second and engine.generated == ids
    from malhae.runtime.llama import Context, Model  # an independent greedy: argmax of full-sequence logits

    with Model(model_path) as m, Context(m, LoadOptions(ctx=256)) as ctx:
        assert ctx.greedy(m.tokenize(PROMPT), 8) == ids[:8]


def test_seed_makes_sampling_repeatable(engine):
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234, max_tokens=24, ignore_eos=True)
    a, _ = engine.complete(PROMPT, s)
    ids_a = list(engine.generated)
    engine.complete(PROMPT, s)
    assert engine.generated == ids_a
    engine.complete(PROMPT, Sampling(**(s.__dict__ | {"seed": 99})))
    assert engine.generated != ids_a


def test_max_tokens_and_stats(engine):
    _, stats = engine.complete(PROMPT, Sampling(temperature=0, max_tokens=7, ignore_eos=True))
    assert stats.generated_tokens == 7 and stats.stop_reason == "length"
    assert stats.prompt_tokens == len(engine.tokenize(PROMPT))
    assert stats.ttft > 0 and stats.decode_seconds > 0 and stats.decode_tps > 0 and stats.prompt_tps > 0


def test_kv_cache_reuse_evaluates_only_new_tokens_and_changes_nothing(engine, model_path):
    engine.cache = []
    engine.complete(PROMPT, GREEDY)
    longer = PROMPT + " 국민으로부터 나온다. 모든 국민은"
    _, stats = engine.complete(longer, GREEDY)
    assert stats.cached_tokens >= len(engine.tokenize(PROMPT)) - 1
    warm = list(engine.generated)
    with Engine(LoadOptions(model=model_path, ctx=256, gpu_layers=0)) as fresh:
        fresh.complete(longer, GREEDY)
        assert fresh.generated == warm and fresh.stats.cached_tokens == 0


def test_stop_string_spanning_tokens_is_cut_exactly(engine):
    engine.cache = []
    text, _ = engine.complete(PROMPT, Sampling(temperature=0, repeat_penalty=1.0, max_tokens=40, ignore_eos=True))
    ids = list(engine.generated)
    pieces = [engine.detokenize([t]) for t in ids]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(3, len(ids) - 1) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1
             and "\ufffd" not in pieces[i] + pieces[i + 1] and pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[k][-1] + pieces[k + 1][:1]
    expected = text[: text.find(stop)]
    shown = list(engine.generate(PROMPT, Sampling(temperature=0, repeat_penalty=1.0, max_tokens=40,
                                                  ignore_eos=True, stop=(stop,))))
    assert "".join(shown) == expected and engine.stats.stop_reason == "stop"
    assert all(stop not in piece for piece in shown)


def test_prompt_longer_than_context_says_by_how_much(model_path):
    with Engine(LoadOptions(model=model_path, ctx=32, gpu_layers=0)) as small:
        long_prompt = "대한민국 헌법 " * 40
        n = len(small.tokenize(long_prompt))
        with pytest.raises(UserError, match=f"the prompt is {n} tokens, {n - 32 + 1} more than the context of 32"):
            small.complete(long_prompt)


def test_answer_stops_when_the_context_is_full(model_path):
    with Engine(LoadOptions(model=model_path, ctx=32, gpu_layers=0)) as small:
        _, stats = small.complete(PROMPT, Sampling(temperature=0, max_tokens=100, ignore_eos=True))
        assert stats.stop_reason == "context" and stats.prompt_tokens + stats.generated_tokens == 32


def test_other_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(UserError, match="is a llama model; malhae runs GPT-NeoX"):
        check_model_file(tmp_path / "llama.gguf")


@pytest.mark.skipif(models.demo_model() is None, reason="the bundled demo model is not built")
def test_long_korean_stream_has_no_broken_characters():
    """A trained model writes real Korean; streamed pieces must never contain U+FFFD and must add up to exactly the
    text of the same tokens decoded at once."""
    with Engine(LoadOptions(model=models.demo_model(), gpu_layers=0)) as demo:
        for seed in (1, 2, 3):
            s = Sampling(temperature=0.9, seed=seed, max_tokens=300, ignore_eos=True)
            pieces = list(demo.generate("대한민국의 국민은", s))
            assert all("\ufffd" not in p for p in pieces), seed
            assert "".join(pieces) == demo.detokenize(demo.generated)
            assert sum(len(p.encode()) for p in pieces) > 300  # it really wrote a long Korean text


def _fake_gpu(monkeypatch, supports: bool, free: int = 20 * 2**30):
    """A GPU cannot be had here: ggml's device list and the machine's facts are replaced (tests/fake_devices.py),
    llama.cpp itself is real."""
    import fake_devices as fake

    from malhae.runtime import hardware

    nvidia = hardware.Facts("Linux", "x86_64", False, ("NVIDIA GeForce RTX 4090",), False)
    gpus = (fake.cuda(0, free, 24 * 2**30),) if supports else ()
    return fake.install(monkeypatch, *gpus, fake.cpu(), facts=nvidia)


def test_cpu_only_build_on_a_gpu_machine_says_how_to_get_cuda(model_path, monkeypatch):
    _fake_gpu(monkeypatch, supports=False)
    said: list[str] = []
    with Engine(LoadOptions(model=model_path, ctx=64), notify=said.append) as e:
        assert e.n_gpu_layers == 0
    assert len(said) == 1 and 'CMAKE_ARGS="-DGGML_CUDA=on" pip install' in said[0] and "RTX 4090" in said[0]


def test_failed_gpu_load_retries_with_fewer_layers(model_path, monkeypatch):
    from malhae.runtime import llama

    _fake_gpu(monkeypatch, supports=True)
    real_init = llama.Model.__init__
    tried: list[int] = []

    def picky(self, path, *, vocab_only=False, n_gpu_layers=0, use_mmap=True, **where):
        tried.append(n_gpu_layers)
        if n_gpu_layers > 1:  # as if the GPU ran out of memory
            raise UserError("cannot load: out of device memory")
        real_init(self, path, vocab_only=vocab_only, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)

    monkeypatch.setattr(llama.Model, "__init__", picky)
    said: list[str] = []
    with Engine(LoadOptions(model=model_path, ctx=64), notify=said.append) as e:
        assert e.n_gpu_layers <= 1
        e.complete(PROMPT, Sampling(temperature=0, max_tokens=4))
    assert tried[0] == 3 and tried == sorted(tried, reverse=True)  # planned all 2 layers + output, then fewer
    assert any("retrying with" in s for s in said)
