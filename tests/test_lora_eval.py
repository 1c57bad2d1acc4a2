"""`--lora` on eval (ppl, compare, kobest) and bench, and the offload planner counting adapters: each path builds its
own llama.cpp context, so each is checked to apply the adapters (a number that moves with them, and equals the
base's at scale 0) and to refuse an adapter of another model before loading."""

from __future__ import annotations

import json
import math

import lora_pair
import pytest

from malhae.cli import main
from malhae.errors import UserError
from malhae.eval import compare, perplexity
from malhae.eval.kobest import data, evaluate
from malhae.eval.kobest.tasks import select
from malhae.eval.loglik import Scorer
from malhae.runtime import kv, offload
from malhae.runtime.gguf_info import read_info
from malhae.runtime.llama import Model
from malhae.runtime.settings import LoadOptions, Lora
from malhae.runtime.windows import Layout

GiB = 2**30


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return lora_pair.build(tmp_path_factory.mktemp("lora-eval"), hidden=128)  # heads of 32: a q8_0 K cache fits


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "
                    "국회는 국민의 보통·평등·직접·비밀선거에 의하여 선출된 국회의원으로 구성한다. " * 8,
                    encoding="utf-8")
    return path


def ppl(pair, text, *loras: Lora) -> float:
    return perplexity.run(LoadOptions(model=pair.base, threads=1, lora=loras), text, Layout.of(64)).ppl


def test_perplexity_with_an_adapter(pair, text):
    plain = ppl(pair, text)
    adapted = ppl(pair, text, Lora(pair.adapter))
    assert adapted != pytest.approx(plain, rel=1e-6) and math.isfinite(adapted)
    assert ppl(pair, text, Lora(pair.adapter, 0.0)) == pytest.approx(plain, rel=1e-9, abs=0)
    assert ppl(pair, text, Lora(pair.adapter, 0.5)) not in (pytest.approx(plain), pytest.approx(adapted))


def test_eval_ppl_through_the_cli(pair, text, capsys):
    args = ["eval", "ppl", str(pair.base), "--text", str(text), "--ctx", "64", "--threads", "1", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--lora", f"{pair.adapter}:0.5"]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert adapted["adapters"] == ["adapter:0.5"] and plain["adapters"] == []
    assert adapted["ppl"] == pytest.approx(ppl(pair, text, Lora(pair.adapter, 0.5)), rel=1e-9)
    assert adapted["ppl"] != pytest.approx(plain["ppl"], rel=1e-6)


def test_compare_applies_the_adapters_to_both_sides(pair, text):
    layout = Layout.of(64)
    both = compare.run(pair.base, pair.base, text, layout, LoadOptions(threads=1, lora=(Lora(pair.adapter),)))
    assert both.kl_mean == 0 and both.top1 == 1 and both.adapters == ("adapter",)
    assert both.ppl_a == both.ppl_b == pytest.approx(ppl(pair, text, Lora(pair.adapter)), rel=1e-9)
    kv_only = compare.run(pair.base, None, text, layout, LoadOptions(threads=1, kv_cache_k="q8_0",
                                                                     lora=(Lora(pair.adapter, 0.0),)))
    assert kv_only.ppl_a == pytest.approx(ppl(pair, text), rel=1e-9)  # A: f16 K/V, the adapter at 0


def test_an_adapter_of_another_model_is_refused_before_loading(pair, text, demo_path):
    fitting = LoadOptions(threads=1, lora=(Lora(pair.adapter),))
    for run in (lambda: perplexity.run(LoadOptions(model=demo_path, lora=fitting.lora), text, Layout.of(64)),
                lambda: compare.run(pair.base, demo_path, text, Layout.of(64), fitting),
                lambda: evaluate.evaluate(LoadOptions(model=demo_path, lora=fitting.lora), data.source(None, False),
                                          select("copa"), [0], limit=1)):
        with pytest.raises(UserError, match="does not fit malhae-demo-ko-f16.gguf"):
            run()


def test_loglik_scores_with_the_adapters(pair):
    """KoBEST's scorer makes its own context: it must apply them (its macro F1 on a random model does not move)."""
    with Model(pair.base) as model:
        context = model.tokenize("대한민국의 주권은 국민에게 있고", add_special=False)
        choices = [model.tokenize(" 모든 권력은", add_special=False), model.tokenize(" 국회는", add_special=False)]

        def scores(*loras: Lora) -> list[float]:
            with Scorer(model, threads=1, lora=loras) as scorer:
                return [c.loglik for c in scorer.score(context, choices)]

        plain = scores()
        assert scores(Lora(pair.adapter)) != pytest.approx(plain, rel=1e-6)
        assert scores(Lora(pair.adapter, 0.0)) == pytest.approx(plain, rel=1e-9)
    report = evaluate.evaluate(LoadOptions(model=pair.base, threads=1, lora=(Lora(pair.adapter, 0.5),)),
                               data.source(None, False), select("copa"), [0], limit=2)
    assert report.cells[0].n == 2 and report.as_dict()["lora"] == ["adapter:0.5"]


def test_kobest_and_bench_through_the_cli(pair, capsys):
    assert main(["eval", "kobest", str(pair.base), "--tasks", "copa", "--shots", "0", "--limit", "2", "--threads", "1",
                 "--lora", str(pair.adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lora"] == ["adapter"]
    bench = ["bench", str(pair.base), "-p", "16", "-n", "8", "-r", "1", "--threads", "1", "--json"]
    assert main([*bench, "--lora", str(pair.adapter)]) == 0
    assert json.loads(capsys.readouterr().out)["lora"] == ["adapter"]
    assert main([*bench, "--lora", str(pair.adapter), "--llama-bench", "/nonexistent/llama-bench"]) == 2
    err = capsys.readouterr().err
    assert "--llama-bench cannot apply LoRA adapters" in err and "Traceback" not in err


# --- the offload planner ----------------------------------------------------------------------------------------

def test_adapter_bytes_go_with_the_layers_they_adapt(pair):
    info = read_info(pair.base)
    plain = offload.model_sizes(info, 256)
    adapted = offload.model_sizes(info, 256, loras=(Lora(pair.adapter), Lora(pair.adapter, 0.5)))
    per_layer = [0] * plain.n_layer
    for t in read_info(pair.adapter).tensors:
        per_layer[int(t.name.split(".")[1])] += t.nbytes  # this adapter adapts the blocks only
    assert all(per_layer)
    assert adapted.layer_bytes == [p + 2 * a for p, a in zip(plain.layer_bytes, per_layer, strict=True)]
    assert adapted.output_bytes == plain.output_bytes and adapted.kv_bytes_per_layer == plain.kv_bytes_per_layer


def test_an_adapter_can_cost_a_layer_on_a_gpu_just_big_enough(pair, monkeypatch):
    """On a (fake) GPU with just enough free memory for the whole model, its adapter does not fit as well: one layer
    fewer is offloaded, where llama.cpp would otherwise run out of memory loading the adapter. The load itself is
    real (this CPU build runs it on the CPU)."""
    import fake_devices as fake

    from malhae.runtime.engine import Engine

    info = read_info(pair.base)
    load = LoadOptions(model=pair.base, ctx=256, batch=256, threads=1)
    sizes = offload.model_sizes(info, kv.cells(256, 1), 256)
    needed = sum(sizes.layer_bytes) + sizes.output_bytes + sizes.kv_bytes_per_layer * sizes.n_layer
    overhead = offload.DEVICE_CONTEXT_BYTES + sizes.compute_bytes
    free = math.ceil((needed + overhead + 1024) / (1 - offload.SAFETY_FRACTION))  # 1 KiB to spare, not an adapter
    loads = fake.install(monkeypatch, fake.cuda(0, free, 24 * GiB), fake.cpu())
    with Engine(load) as engine:
        assert engine.plan.full
    with Engine(LoadOptions(**{**load.__dict__, "lora": (Lora(pair.adapter),)})) as engine:
        assert not engine.plan.full and engine.n_gpu_layers == sizes.n_layer  # blk.0 stays on the CPU
        assert engine.complete("국회는")[0] is not None
    assert loads.layers == [sizes.n_layer + 1, sizes.n_layer]
    what_if = offload.choose(info, LoadOptions(ctx=256, batch=256, lora=(Lora(pair.adapter),)), vram=free)
    assert what_if.n_gpu_layers == sizes.n_layer  # `malhae info --vram` plans the same
