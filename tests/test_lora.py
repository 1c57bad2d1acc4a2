"""LoRA adapters are proven equal to PEFT: converted and applied by llama.cpp at run time, or merged while converting.

The reference is always transformers + PEFT on the same random checkpoint (never malhae's own arithmetic), and each
test of a rule has a twin that breaks the rule and must fail: the QKV reorder of lora_B, the rslora scale.
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from malhae.convert import lora, lora_gguf, merge, pipeline, verify
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions, Lora

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

ALL_LINEAR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
F32_TOLERANCE = 1e-3  # the base converter's, relative to max(1, max |logit|)


def make_adapter(src, out, seed=1, **config):
    """A PEFT adapter of `src` with random A and B (init_lora_weights=False), saved as PEFT saves it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["query_key_value"], "init_lora_weights": False} | config
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    with torch.no_grad():  # everything trainable moved, far enough that a wrong reorder, scale or rule shows
        for name, p in peft_model.named_parameters():
            if not p.requires_grad or "lora_A" in name or "lora_embedding_A" in name:
                continue  # frozen base weights; A is random already (init_lora_weights=False)
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            else:  # DoRA magnitudes, trained biases, saved modules: their trained values differ from the base's
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return out


def prompt_tokens(src, n=3):
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    return [tok.encode(p, add_special_tokens=False).ids for p in verify.default_prompts()[:n]]


def peft_logits(src, adapter_dir, tokens, scale=1.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    if scale != 1:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.mul_(scale)
    with torch.no_grad():
        return [model(torch.tensor([t])).logits[0].numpy() for t in tokens]


def llama_logits(base_gguf, tokens, loras=()):
    options = LoadOptions(ctx=256, batch=256, lora=tuple(loras))
    with Model(base_gguf) as model, Context(model, options, precise=True) as ctx:
        return [ctx.logits(t) for t in tokens]


def worst(ref, got):
    """max |Δ| over all prompts, relative to max(1, max |logit|)."""
    return max(float(np.abs(r - g[:, :r.shape[1]]).max()) / max(1.0, float(np.abs(r).max()))
               for r, g in zip(ref, got, strict=True))


@pytest.fixture(scope="module")
def f32_base(checkpoints, tmp_path_factory):
    """name → the checkpoint's F32 GGUF, converted once."""
    root = tmp_path_factory.mktemp("lora-bases")
    made = {}

    def get(name):
        if name not in made:
            made[name] = pipeline.convert(checkpoints(name), "f32", root / f"{name}.gguf").path
        return made[name]

    return get


CASES = {
    # PEFT's GPT-NeoX default, on the published layout (sharded f16 safetensors, embed_out)
    "qkv": ("tf4-st-f16", {}),
    # every linear layer and the output head, on a transformers-5 checkpoint (lm_head) with another head size
    "all-linear": ("tf5-bin-f32-digits", {"target_modules": [*ALL_LINEAR, "lm_head"], "r": 8, "lora_alpha": 16}),
    # rslora: alpha / √r, which upstream's converter ignores
    "rslora": ("tf4-st-f16", {"use_rslora": True}),
    # per-module ranks and alphas
    "patterns": ("bin-f16-seq", {"target_modules": ALL_LINEAR, "rank_pattern": {"dense_h_to_4h": 2},
                                 "alpha_pattern": {"query_key_value": 3.0}}),
    # head_dim 256 (polyglot-ko-5.8b's), bf16 weights
    "hd256": ("hd256-st-bf16", {"target_modules": ["query_key_value", "dense"], "r": 16, "lora_alpha": 32}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unmerged_logits_match_peft(case, checkpoints, f32_base, tmp_path):
    name, config = CASES[case]
    src = checkpoints(name)
    peft_dir = make_adapter(src, tmp_path / "peft", **config)
    adapter = lora.read(peft_dir)
    out = lora_gguf.write(adapter, lora_gguf.Base.from_gguf(f32_base(name)), tmp_path / "a.gguf", type_name="f32")
    tokens = prompt_tokens(src)
    ref = peft_logits(src, peft_dir, tokens)
    got = llama_logits(f32_base(name), tokens, [Lora(out.path)])
    base_only = llama_logits(f32_base(name), tokens)
    assert worst(ref, base_only) > 50 * F32_TOLERANCE  # the adapter changes the logits far beyond the tolerance
    assert worst(ref, got) <= F32_TOLERANCE


def test_scale_matches_peft_scaled(checkpoints, f32_base, tmp_path):
    src = checkpoints("tf4-st-f16")
    peft_dir = make_adapter(src, tmp_path / "peft", target_modules=ALL_LINEAR)
    out = lora_gguf.write(lora.read(peft_dir), lora_gguf.Base.from_gguf(f32_base("tf4-st-f16")), tmp_path / "a.gguf",
                          type_name="f32")
    tokens = prompt_tokens(src, 2)
    got = llama_logits(f32_base("tf4-st-f16"), tokens, [Lora(out.path, 0.4)])
    assert worst(peft_logits(src, peft_dir, tokens, scale=0.4), got) <= F32_TOLERANCE
    assert worst(peft_logits(src, peft_dir, tokens), got) > 10 * F32_TOLERANCE


def test_without_the_qkv_reorder_the_adapter_is_wrong(checkpoints, f32_base, tmp_path, monkeypatch):
    """lora_B's rows must be reordered as the base's QKV rows are: without it the file loads and runs, wrongly."""
    from malhae.convert import tensors

    src = checkpoints("tf4-st-f16")
    base = f32_base("tf4-st-f16")  # converted (with its own reorder) before the reorder is broken
    peft_dir = make_adapter(src, tmp_path / "peft")
    monkeypatch.setattr(tensors, "reorder_qkv", lambda data, n_head: data)
    out = lora_gguf.write(lora.read(peft_dir), lora_gguf.Base.from_gguf(base), tmp_path / "a.gguf", type_name="f32")
    tokens = prompt_tokens(src, 2)
    assert worst(peft_logits(src, peft_dir, tokens), llama_logits(base, tokens, [Lora(out.path)])) > 10 * F32_TOLERANCE


def test_rslora_written_as_upstream_does_is_wrong(checkpoints, f32_base, tmp_path, monkeypatch):
    """Upstream's convert_lora_to_gguf.py writes lora_alpha as it is (llama.cpp then scales by alpha / r); under
    rslora that is off by √r. Reading the config as if rslora were off writes exactly that file."""
    src = checkpoints("tf4-st-f16")
    peft_dir = make_adapter(src, tmp_path / "peft", use_rslora=True, r=16, lora_alpha=8)
    monkeypatch.setattr(lora.LoraConfig, "scaling", lambda self, module: self.alpha / self.r)
    out = lora_gguf.write(lora.read(peft_dir), lora_gguf.Base.from_gguf(f32_base("tf4-st-f16")), tmp_path / "a.gguf",
                          type_name="f32")
    tokens = prompt_tokens(src, 2)
    got = llama_logits(f32_base("tf4-st-f16"), tokens, [Lora(out.path)])
    assert worst(peft_logits(src, peft_dir, tokens), got) > 10 * F32_TOLERANCE


def test_f16_adapter_on_f16_base(checkpoints, tmp_path):
    """The default output (f16 A and B) on an F16 base: judged as an F16 conversion is (verify's F16 criterion:
    f16 rounding of weights and activations grows with what the adapter adds)."""
    src = checkpoints("tf4-st-f16")
    base = pipeline.convert(src, "f16", tmp_path / "base.gguf").path
    peft_dir = make_adapter(src, tmp_path / "peft", target_modules=ALL_LINEAR)
    out = lora_gguf.write(lora.read(peft_dir), lora_gguf.Base.from_gguf(base), tmp_path / "a.gguf")
    tokens = prompt_tokens(src)
    report = verify.compare("f16", verify.default_prompts()[:3], tokens, peft_logits(src, peft_dir, tokens),
                            llama_logits(base, tokens, [Lora(out.path)]))
    assert report.passed, report.rows


MERGES = {
    "all-linear": {"target_modules": [*ALL_LINEAR, "lm_head"], "use_rslora": True},
    "dora-biases-saved": {"target_modules": ["dense_h_to_4h", "query_key_value"], "use_dora": True, "bias": "all",
                          "modules_to_save": ["lm_head"]},
    "lora-bias": {"target_modules": ["query_key_value", "dense"], "lora_bias": True},
    "embedding": {"target_modules": ["embed_in", "dense_4h_to_h"]},
}


@pytest.mark.parametrize("case", list(MERGES))
def test_merged_logits_match_peft_merge(case, checkpoints, tmp_path):
    src = checkpoints("tf4-st-f16")
    peft_dir = make_adapter(src, tmp_path / "peft", **MERGES[case])
    specs = [merge.Spec(peft_dir, 0.75)]
    out = pipeline.convert(src, "f32", tmp_path / "merged.gguf", merge=specs).path
    assert verify.verify(src, out, "f32", merge=specs).passed
    # the same file judged against the adapter at another scale must fail: the comparison can tell
    assert verify.verify(src, out, "f32", merge=[merge.Spec(peft_dir, 1.0)]).passed is False


def test_two_adapters_merge_in_order(checkpoints, tmp_path):
    src = checkpoints("tf4-st-f16")
    first = make_adapter(src, tmp_path / "one", seed=1, target_modules=ALL_LINEAR)
    second = make_adapter(src, tmp_path / "two", seed=2, use_dora=True, target_modules=["query_key_value"])
    specs = [merge.Spec(first, 0.5), merge.Spec(second, 1.0)]
    out = pipeline.convert(src, "f32", tmp_path / "merged.gguf", merge=specs).path
    assert verify.verify(src, out, "f32", merge=specs).passed


def test_what_llama_cpp_cannot_apply_is_refused_naming_merge(checkpoints, f32_base, tmp_path):
    src = checkpoints("tf4-st-f16")
    base = lora_gguf.Base.from_gguf(f32_base("tf4-st-f16"))
    for config, said in (({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "lora_bias"),
                         ({"bias": "all"}, "trained biases"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                         ({"target_modules": ["embed_in"]}, "embedding")):
        peft_dir = make_adapter(src, tmp_path / said.replace(" ", "-"), **config)
        with pytest.raises(lora.AdapterError, match=f"{said}.*--merge-lora"):
            lora_gguf.write(lora.read(peft_dir), base, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()


def test_adapter_of_another_model_is_refused_before_writing(checkpoints, f32_base, tmp_path):
    peft_dir = make_adapter(checkpoints("tf4-st-f16"), tmp_path / "peft")
    other = lora_gguf.Base.from_gguf(f32_base("hd256-st-bf16"))
    with pytest.raises(lora.AdapterError, match="does not fit hd256-st-bf16.gguf"):
        lora_gguf.write(lora.read(peft_dir), other, tmp_path / "x.gguf")
    assert list(tmp_path.glob("*.gguf")) == []
    with pytest.raises(lora.AdapterError, match="does not fit"):
        pipeline.convert(checkpoints("hd256-st-bf16"), "f16", tmp_path / "m.gguf", merge=[merge.Spec(peft_dir)])
    assert list(tmp_path.iterdir()) == [tmp_path / "peft"]


def test_base_names_compare_by_their_last_part():
    from malhae.runtime.lora import other_base

    assert not other_base("EleutherAI/polyglot-ko-5.8b", ["polyglot-ko-5.8b-q4_k_m", None])
    assert not other_base("/home/me/models/polyglot-ko-5.8b/", ["EleutherAI/polyglot-ko-5.8b"])
    assert other_base("beomi/KoAlpaca-Polyglot-5.8B", ["polyglot-ko-5.8b", "polyglot-ko-5.8b-q4_k_m.gguf"])
    assert not other_base(None, ["anything"])  # an adapter that does not say: nothing to say either


def test_engine_switches_adapters_as_a_fresh_engine_would(checkpoints, f32_base, tmp_path):
    """Engine.set_lora mid-session gives what an engine loaded with that set gives: the K/V computed with the old
    set are not reused, and the prompt cache keeps its states apart per set."""
    from malhae.runtime.engine import Engine
    from malhae.runtime.settings import Sampling

    src = checkpoints("tf4-st-f16")
    base = f32_base("tf4-st-f16")
    peft_dir = make_adapter(src, tmp_path / "peft", target_modules=ALL_LINEAR)
    adapter = lora_gguf.write(lora.read(peft_dir), lora_gguf.Base.from_gguf(base), tmp_path / "a.gguf").path
    greedy = Sampling(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = prompt_tokens(src, 1)[0]
    options = LoadOptions(model=base, ctx=256, threads=2, prompt_cache=tmp_path / "cache")
    with Engine(LoadOptions(model=base, ctx=256, threads=2, lora=(Lora(adapter, 0.5),))) as fresh:
        want = fresh.complete(prompt, greedy)[0]
    with Engine(options) as engine:
        plain = engine.complete(prompt, greedy)[0]
        plain_folder = engine.prompt_cache.folder
        engine.set_lora((Lora(adapter, 0.5),))
        assert engine.complete(prompt, greedy)[0] == want != plain
        assert engine.prompt_cache.folder != plain_folder
        engine.set_lora(())
        assert engine.complete(prompt, greedy)[0] == plain


def test_fan_in_fan_out_changes_nothing_for_gpt_neox(checkpoints, f32_base, tmp_path):
    """fan_in_fan_out describes Conv1D weights; GPT-NeoX's are nn.Linear, PEFT turns it off when it loads such an
    adapter, and A and B keep their shapes: the converted file must compute what PEFT computes with it set."""
    import json

    src = checkpoints("tf4-st-f16")
    peft_dir = make_adapter(src, tmp_path / "peft", target_modules=ALL_LINEAR)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": True}))
    adapter = lora.read(peft_dir)
    assert adapter.config.fan_in_fan_out
    out = lora_gguf.write(adapter, lora_gguf.Base.from_gguf(f32_base("tf4-st-f16")), tmp_path / "a.gguf",
                          type_name="f32")
    tokens = prompt_tokens(src, 2)
    got = llama_logits(f32_base("tf4-st-f16"), tokens, [Lora(out.path)])
    assert worst(peft_logits(src, peft_dir, tokens), got) <= F32_TOLERANCE


def test_a_bin_adapter_reads_as_its_safetensors_twin(checkpoints, f32_base, tmp_path):
    """Older PEFT (the KoAlpaca QLoRA era) saved adapter_model.bin: read with weights_only, it converts to the same
    file as the safetensors copy of the same adapter."""
    import json

    from safetensors.torch import load_file

    src = checkpoints("tf4-st-f16")
    peft_dir = make_adapter(src, tmp_path / "st", target_modules=ALL_LINEAR)
    old = tmp_path / "bin"
    old.mkdir()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    for key in ("use_rslora", "rank_pattern", "alpha_pattern", "use_dora"):  # keys old PEFT did not write
        config.pop(key, None)
    (old / "adapter_config.json").write_text(json.dumps(config))
    torch.save(load_file(peft_dir / "adapter_model.safetensors"), old / "adapter_model.bin")
    base = lora_gguf.Base.from_gguf(f32_base("tf4-st-f16"))
    a = lora_gguf.write(lora.read(peft_dir), base, tmp_path / "a.gguf", type_name="f32").path
    b = lora_gguf.write(lora.read(old), base, tmp_path / "b.gguf", type_name="f32").path
    import gguf

    ta, tb = gguf.GGUFReader(a).tensors, gguf.GGUFReader(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb] and len(ta) == 16
    assert all(np.array_equal(x.data, y.data) for x, y in zip(ta, tb, strict=True))
    tokens = prompt_tokens(src, 1)
    assert worst(llama_logits(base.path, tokens, [Lora(a)]), llama_logits(base.path, tokens, [Lora(b)])) == 0
