"""Picks per memory size: the offload planner's own arithmetic on the catalog's computed sizes, and `recommend`."""

from __future__ import annotations

import json

import pytest

from malhae.cli import main
from malhae.convert import pipeline
from malhae.convert.sizing import Shape, sized_tensors, summarize
from malhae.runtime import offload
from malhae.runtime.gguf_info import read_info
from malhae.store import catalog, recommend
from malhae.store.catalog import QUALITY_ORDER, Entry, Sizes

GiB = 2**30


def _gpu_need(e: Entry, t: str) -> tuple[float, float]:
    """(what must fit, the budget) written out from offload.py's rule, for 1 GiB of free memory."""
    s = e.sizes[t]
    kv = 2 * e.context * e.d_model * 2
    compute = 512 * (e.vocab_rows + 4 * e.d_ff + 8 * e.d_model) * 4 + 64 * 2**20
    return s.gpu_weights + kv * e.layers, compute + offload.DEVICE_CONTEXT_BYTES


@pytest.mark.parametrize("gb", recommend.VRAM_SIZES_GB)
def test_gpu_pick_is_the_best_type_that_fits_fully(gb):
    free = gb * GiB
    budget_free = free * (1 - offload.SAFETY_FRACTION)
    for e in catalog.load():
        p = recommend.pick_gpu(e, free)
        fits = [t for t in QUALITY_ORDER if sum(_gpu_need(e, t)) <= budget_free]
        assert p.type == (fits[0] if fits else None), (e.name, gb)
        if p.type is None:
            assert p.partial is not None and not p.partial.full


def test_known_picks():
    big = catalog.find("polyglot-ko-12.8b")
    assert recommend.pick_gpu(big, 24 * GiB).type == "q8_0"  # f16 is 25.8 GB of tensors: not on a 24 GB card
    p = recommend.pick_gpu(big, 4 * GiB)
    assert p.type is None and 0 < p.partial.n_gpu_layers < big.layers  # partial offload of q4_k_m
    assert recommend.pick_gpu(catalog.find("polyglot-ko-1.3b"), 4 * GiB).type == "f16"


def test_more_memory_never_picks_worse():
    rank = {t: i for i, t in enumerate(QUALITY_ORDER)}
    for e in catalog.load():
        for picks in ([recommend.pick_gpu(e, g * GiB).type for g in range(2, 40)],
                      [recommend.pick_ram(e, g * GiB).type for g in range(2, 64)]):
            ranks = [rank.get(t, len(rank)) for t in picks]
            assert ranks == sorted(ranks, reverse=True), e.name


def test_ram_rule_is_three_quarters_of_ram():
    for e in catalog.load():
        for gb in recommend.RAM_SIZES_GB:
            p = recommend.pick_ram(e, gb * GiB)
            budget = gb * GiB * recommend.RAM_FRACTION
            kv = 2 * e.context * e.d_model * 2 * e.layers
            compute = 512 * (e.vocab_rows + 4 * e.d_ff + 8 * e.d_model) * 4 + 64 * 2**20
            need = {t: e.sizes[t].total + kv + compute for t in QUALITY_ORDER}
            allowed = QUALITY_ORDER[QUALITY_ORDER.index("q4_k_m"):]  # no bigger type without a GPU: slower decode
            fits = [t for t in allowed if need[t] <= budget]
            assert p.type == (fits[0] if fits else None)
            if p.type:
                assert p.needed == need[p.type]


def test_planner_sizes_equal_what_the_engine_reads_from_the_real_file(k_quant_checkpoint, tmp_path):
    """From the catalog's numbers, the same ModelSizes that offload.model_sizes makes from the converted GGUF."""
    shape = Shape(2, 256, 512, 4, 1024)
    path = pipeline.convert(k_quant_checkpoint, "q4_k_m", tmp_path / "m.gguf").path
    total, token_embd, output, layers, mix = summarize(sized_tensors(shape, "q4_k_m"), 2)
    entry = Entry(name="tiny", hub_id="x/tiny", parameters=shape.n_params, layers=2, d_model=256, d_ff=512, heads=4,
                  vocab_rows=1024, tokenizer="x", context=2048, license="", template="base", description="",
                  sizes={"q4_k_m": Sizes(total, token_embd, output, layers, mix)})
    assert recommend.planner_sizes(entry, "q4_k_m") == offload.model_sizes(read_info(path), n_cells=2048)


def test_recommend_json_for_given_vram(capsys):
    assert main(["recommend", "--vram", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vram_bytes"] == 8 * GiB
    for m in data["models"]:
        p = recommend.pick_gpu(catalog.find(m["name"]), 8 * GiB)
        assert m["type"] == p.type and m["where"] == "gpu"
        assert m["pull"] == f"malhae pull {m['name']} --type {p.type}"


def test_recommend_ram_only_and_partial(capsys):
    assert main(["recommend", "--vram", "0", "--ram", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vram_bytes"] is None and {m["where"] for m in data["models"]} == {"ram"}
    assert main(["recommend", "--vram", "4"]) == 0
    captured = capsys.readouterr()
    assert "malhae pull polyglot-ko-1.3b --type f16" in captured.out
    assert "partly:" in captured.out and "malhae pull polyglot-ko-12.8b --type q4_k_m" in captured.out
    assert "4.00 GiB VRAM given" in captured.err


def test_machine_reads_this_machine_without_arguments():
    m = recommend.machine()
    assert m.ram_bytes > GiB and not m.ram_given
    m = recommend.machine(vram_gb=6, ram_gb=12)
    assert (m.vram_bytes, m.ram_bytes, m.vram_given) == (6 * GiB, 12 * GiB, True)


def test_memory_amounts_are_checked_alike_by_info_and_recommend(capsys):
    """`info --vram nan|inf` and `recommend --ram nan` / `--vram inf` were internal errors; `recommend --vram -1` was
    accepted while `info --vram -5` was refused. One rule now, one message."""
    from malhae.cli import main

    for value in ("nan", "inf", "-1", "2000000"):
        for args in (["info", "--vram", value], ["recommend", "--vram", value], ["recommend", "--ram", value]):
            assert main(args) == 2, args
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("malhae: error:")]
            assert len(errors) == 1 and "give a number of GiB from 0 to 1048576" in errors[0], (args, err)
            assert "internal error" not in err
            assert len(err.strip().splitlines()) == 1, err  # refused before any note about the demo model
    assert main(["recommend", "--vram", "8", "--ram", "16"]) == 0
