"""Every output type `malhae convert --type` offers (the IQ types with --imatrix auto where they need one) is
written, loads in llama.cpp and generates."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from malhae.convert import pipeline
from malhae.convert import types as out_types
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions

# The GGML type each output's 2-D weights must use (llama.cpp's mixes keep some tensors at higher precision).
MAIN_TENSOR_TYPE = {
    "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K",
    "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q4_1": "Q4_1", "q4_0": "Q4_0",
    "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS", "q3_k_l": "Q3_K", "q3_k_m": "Q3_K", "q3_k_s": "Q3_K", "q2_k": "Q2_K",
    # the IQ types; those that need an importance matrix are converted with --imatrix auto
    "iq3_m": "IQ3_S", "iq3_s": "IQ3_S", "iq3_xs": "IQ3_S", "iq3_xxs": "IQ3_XXS", "q2_k_s": "Q2_K", "iq2_m": "IQ2_S",
    "iq2_s": "IQ2_XS", "iq2_xs": "IQ2_XS", "iq2_xxs": "IQ2_XXS", "iq1_m": "IQ1_M", "iq1_s": "IQ1_S",
}


def test_every_type_is_listed():
    assert set(MAIN_TENSOR_TYPE) == set(out_types.TYPES)


@pytest.fixture(scope="module")
def f16_reference(k_quant_checkpoint, tmp_path_factory):
    path = pipeline.convert(k_quant_checkpoint, "f16", tmp_path_factory.mktemp("ref") / "ref.gguf").path
    with Model(path) as model, Context(model, LoadOptions(ctx=128)) as ctx:
        tokens = model.tokenize("대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.")
        return tokens, ctx.logits(tokens)


@pytest.mark.parametrize("type_name", list(MAIN_TENSOR_TYPE))
def test_type_loads_and_generates(type_name, k_quant_checkpoint, f16_reference, tmp_path):
    imatrix = "auto" if out_types.TYPES[type_name].needs_imatrix else None
    result = pipeline.convert(k_quant_checkpoint, type_name, tmp_path / f"m-{type_name}.gguf", imatrix=imatrix)
    assert result.path.is_file()
    assert not list(tmp_path.glob(".*partial")), "temporary files left behind"

    reader = gguf.GGUFReader(result.path)
    file_type = int(reader.fields["general.file_type"].parts[-1][0])
    assert file_type == int(out_types.TYPES[type_name].ftype)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2 and t.shape[1] > 1:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert MAIN_TENSOR_TYPE[type_name] in counts, counts

    tokens, ref_logits = f16_reference
    with Model(result.path) as model, Context(model, LoadOptions(ctx=128)) as ctx:
        logits = ctx.logits(tokens)
        assert np.isfinite(logits).all()
        generated = ctx.greedy(tokens, 8)
    assert len(generated) == 8 and all(0 <= t < model.n_vocab for t in generated)
    # a sanity bound on quality, loose enough for 2-bit: the logits still track the f16 ones
    corr = np.corrcoef(logits.ravel(), ref_logits.ravel())[0, 1]
    # 1.6-1.8 bits (iq1_*, measured 0.76-0.78 on this random model) are meant for the largest models only
    floor = 0.999 if type_name in ("f32", "f16", "bf16", "q8_0") else 0.7 if type_name.startswith("iq1") else 0.8
    assert corr > floor, corr
