"""The catalog: its data, its computed sizes (proven against real quantizations), and `malhae models catalog`."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import factory
import pytest

from malhae.cli import main
from malhae.convert import pipeline
from malhae.convert.sizing import Shape, sized_tensors, summarize
from malhae.errors import UserError
from malhae.runtime.gguf_info import read_info
from malhae.store import catalog

ROOT = Path(__file__).resolve().parent.parent
FAMILY = {  # hub id → (layers, d_model, d_ff, heads), from the EleutherAI model cards (../shared/notes)
    "EleutherAI/polyglot-ko-1.3b": (24, 2048, 8192, 16), "EleutherAI/polyglot-ko-3.8b": (32, 3072, 12288, 24),
    "EleutherAI/polyglot-ko-5.8b": (28, 4096, 16384, 16), "EleutherAI/polyglot-ko-12.8b": (40, 5120, 20480, 40),
    "beomi/KoAlpaca-Polyglot-5.8B": (28, 4096, 16384, 16), "beomi/KoAlpaca-Polyglot-12.8B": (40, 5120, 20480, 40),
    "nlpai-lab/kullm-polyglot-5.8b-v2": (28, 4096, 16384, 16),
    "nlpai-lab/kullm-polyglot-12.8b-v2": (40, 5120, 20480, 40),
}


def test_the_family_is_all_there_with_its_shapes():
    entries = catalog.load()
    assert {e.hub_id: (e.layers, e.d_model, e.d_ff, e.heads) for e in entries} == FAMILY
    assert all(e.vocab_rows == 30080 and e.context == 2048 for e in entries)
    templates = {e.name: e.template for e in entries}
    assert templates["polyglot-ko-5.8b"] == "base"
    assert templates["koalpaca-polyglot-12.8b"] == "koalpaca" and templates["kullm-polyglot-5.8b-v2"] == "kullm"


def test_parameters_are_counted_from_the_shapes():
    for e in catalog.load():
        assert e.parameters == Shape(e.layers, e.d_model, e.d_ff, e.heads, e.vocab_rows).n_params, e.name
    assert catalog.find("polyglot-ko-1.3b").parameters == 1_331_810_304  # as on the model card


def test_stored_sizes_are_what_llama_cpp_says_now():
    """The generated file must match a fresh computation (else: python benchmarks/catalog_sizes.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import catalog_sizes

    assert catalog_sizes.render(catalog_sizes.compute()) == (ROOT / "models" / "catalog-sizes.toml").read_text(
        encoding="utf-8"), "models/catalog-sizes.toml is stale: run python benchmarks/catalog_sizes.py"


def test_sizes_follow_the_quality_order_and_add_up():
    for e in catalog.load():
        totals = [e.sizes[t].total for t in catalog.QUALITY_ORDER]
        assert totals == sorted(totals, reverse=True), e.name
        d, f, v, n = e.d_model, e.d_ff, e.vocab_rows, e.layers
        matrices = 2 * v * d + n * (3 * d * d + d * d + 2 * f * d)
        vectors = 2 * d + n * (4 * d + 3 * d + d + f + d)  # norms and biases
        assert matrices + vectors == e.parameters
        f16 = e.sizes["f16"]
        assert f16.total == 2 * matrices + 4 * vectors  # matrices in f16, norms and biases stay f32
        assert f16.token_embd == e.vocab_rows * e.d_model * 2


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory):
    """Rows of 256 (k-quants apply) and 8 layers, so that llama.cpp's per-layer choices differ across layers."""
    return factory.build(tmp_path_factory.mktemp("sizing") / "ck", factory.Spec(
        "sizing", hidden=256, heads=4, ff=512, layers=8, weights="safetensors", legacy_buffers=False))


@pytest.mark.parametrize("type_name", ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"])
def test_predicted_tensors_equal_a_real_quantization(eight_layers, tmp_path, type_name):
    predicted = {t.name: (t.type.name, t.nbytes) for t in sized_tensors(Shape(8, 256, 512, 4, 1024), type_name)}
    real_path = pipeline.convert(eight_layers, type_name, tmp_path / "m.gguf").path
    real = {t.name: (t.type.name, t.nbytes) for t in read_info(real_path).tensors}
    assert predicted == real
    if type_name.endswith("_m"):  # a real mix: more than one quantized type, and layers that differ
        kinds = {k for k, _ in real.values() if k not in ("F32",)}
        assert len(kinds) >= 2, kinds
        _, _, _, layers, _ = summarize(sized_tensors(Shape(8, 256, 512, 4, 1024), type_name), 8)
        assert len(set(layers)) >= 2


def test_find_by_name_or_hub_id_and_suggest():
    assert catalog.find("KULLM-Polyglot-12.8B-v2").hub_id == "nlpai-lab/kullm-polyglot-12.8b-v2"
    assert catalog.find("beomi/koalpaca-polyglot-5.8b").name == "koalpaca-polyglot-5.8b"
    with pytest.raises(UserError, match="did you mean koalpaca-polyglot-5.8b"):
        catalog.find("koalpaca-5.8b")
    assert catalog.lookup("gpt2") is None


def _raw():
    return catalog.read_toml("catalog.toml"), catalog.read_toml("catalog-sizes.toml")


def test_validation_names_the_problem():
    cat, sizes = _raw()
    bad = copy.deepcopy(cat)
    del bad["model"][0]["license"]
    with pytest.raises(UserError, match="polyglot-ko-1.3b needs license"):
        catalog.parse(bad, sizes)
    bad = copy.deepcopy(cat)
    bad["model"][1]["template"] = "alpaca"
    with pytest.raises(UserError, match="template 'alpaca'"):
        catalog.parse(bad, sizes, {"base", "koalpaca", "kullm"})
    bad = copy.deepcopy(cat)
    bad["model"][2]["d_ff"] = 16000  # a shape the sizes file does not know: stale
    with pytest.raises(UserError, match="benchmarks/catalog_sizes.py"):
        catalog.parse(bad, sizes)
    stale = copy.deepcopy(sizes)
    stale["shape"]["L24-d2048-ff8192-h16-v30080"]["q4_k_m"]["total"] += 1
    with pytest.raises(UserError, match="do not add up"):
        catalog.parse(cat, stale)
    dup = copy.deepcopy(cat)
    dup["model"].append(dup["model"][0])
    with pytest.raises(UserError, match="appears twice"):
        catalog.parse(dup, sizes)


def test_models_catalog_command(capsys):
    assert main(["models", "catalog"]) == 0
    text = capsys.readouterr().out
    assert "kullm-polyglot-12.8b-v2" in text and "nlpai-lab/kullm-polyglot-12.8b-v2" in text
    e = catalog.find("polyglot-ko-12.8b")
    assert f"{e.sizes['q4_k_m'].total / 1e9:.2f}" in text  # the computed number, as shown
    assert "q5_k_m" in text and "apache-2.0" in text


def test_models_catalog_json(capsys):
    assert main(["models", "catalog", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in data["models"]}
    assert set(by_name) == {e.name for e in catalog.load()}
    e = catalog.find("polyglot-ko-5.8b")
    assert by_name[e.name]["sizes"]["q6_k"]["total"] == e.sizes["q6_k"].total
    assert set(by_name[e.name]["picks"]) == {"4G", "6G", "8G", "12G", "16G", "24G", "RAM 8G", "RAM 16G", "RAM 32G"}


def test_the_catalog_knows_which_models_draft_for_which(capsys):
    """All of the family shares one tokenizer: the smaller base models can draft for every larger model, and
    nothing drafts for the smallest (the vocabulary check at load time is tested in test_speculative)."""
    names = lambda model: [d.name for d in catalog.drafts_for(catalog.find(model))]  # noqa: E731
    assert names("polyglot-ko-12.8b") == ["polyglot-ko-1.3b", "polyglot-ko-3.8b", "polyglot-ko-5.8b"]
    assert names("kullm-polyglot-5.8b-v2") == ["polyglot-ko-1.3b", "polyglot-ko-3.8b"]
    assert names("polyglot-ko-1.3b") == []
    assert main(["models", "catalog", "--json"]) == 0
    data = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert data["koalpaca-polyglot-12.8b"]["draft_models"][0] == "polyglot-ko-1.3b"
    assert data["koalpaca-polyglot-12.8b"]["tokenizer"] == "polyglot-ko"
