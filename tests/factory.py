"""Build small checkpoints shaped like the published Polyglot-Ko repositories, for the converter's tests.

Real Polyglot-Ko weights cannot be downloaded here, so each test model reproduces what matters about them: the
config.json keys as published (transformers 4) or as transformers 5 writes them, sharded .bin pickles or safetensors,
fp16/bf16/fp32, the legacy buffers old checkpoints carry, a tokenizer with fewer entries than embedding rows, the
family's special tokens, and byte-level BPE tokenizers trained on Korean public-domain text with either
pre-tokenizer the family uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "models" / "data" / "ko-public-domain"
SPECIALS = ["<|endoftext|>", "<|sep|>", "<|acc|>", "<|rrn|>", "<|tell|>"]


@dataclass(frozen=True)
class Spec:
    name: str
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    ff: int = 256
    vocab_rows: int = 1024  # embedding rows; the tokenizer gets fewer entries (like 30,003 vs 30,080)
    tokenizer_entries: int = 1000
    pre: str = "bytelevel"  # or "digits": Digits(individual_digits) + ByteLevel
    weights: str = "safetensors-sharded"  # safetensors | safetensors-sharded | bin | bin-sharded
    dtype: str = "f16"  # f16 | bf16 | f32
    schema: str = "tf4"  # tf4: rotary_pct/rotary_emb_base as published; tf5: rope_parameters
    legacy_buffers: bool = True
    rotary_pct: float = 0.5
    parallel_residual: bool = True
    ctx: int = 256
    init_std: float = 0.02
    seed: int = 0
    never_eos: bool = False  # the end-of-text token gets a logit near -1000 whatever the input: answers never end


    def but(self, **changes) -> Spec:
        return replace(self, **changes)


def corpus_text() -> str:
    parts = [(CORPUS_DIR / "constitution.txt").read_text(encoding="utf-8")]
    parts += [p.read_text(encoding="utf-8") for p in sorted((CORPUS_DIR / "bills").glob("*.txt"))]
    return "\n".join(parts)


def train_tokenizer(out: Path, spec: Spec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec.pre == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.tokenizer_entries, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[0], "unk_token": SPECIALS[0]}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps(
        special | {"model_max_length": spec.ctx, "tokenizer_class": "PreTrainedTokenizerFast"}))


def build(out: Path, spec: Spec) -> Path:
    """Write the checkpoint into `out` (created) and return it."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, spec)
    cfg = GPTNeoXConfig(vocab_size=spec.vocab_rows, hidden_size=spec.hidden, num_attention_heads=spec.heads,
                        num_hidden_layers=spec.layers, intermediate_size=spec.ff, max_position_embeddings=spec.ctx,
                        rotary_pct=spec.rotary_pct, rotary_emb_base=10000, use_parallel_residual=spec.parallel_residual,
                        layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                        initializer_range=spec.init_std, hidden_act="gelu")
    torch.manual_seed(spec.seed)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # give layer norms non-trivial parameters, so a mapping mistake there shows in logits
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))
        if spec.never_eos:  # one hidden unit is a constant 1 after the final norm; EOS's output row weighs it -1000
            norm = model.gpt_neox.final_layer_norm
            norm.weight[0], norm.bias[0] = 0.0, 1.0
            model.get_output_embeddings().weight[0, 0] = -1000.0  # token 0 is <|endoftext|>, the eos

    config = cfg.to_dict()
    if spec.schema == "tf4":  # what the published polyglot-ko config.json looks like
        config = {
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0,
            "hidden_act": "gelu", "hidden_size": spec.hidden, "initializer_range": spec.init_std,
            "intermediate_size": spec.ff, "layer_norm_eps": 1e-5, "max_position_embeddings": spec.ctx,
            "num_attention_heads": spec.heads, "num_hidden_layers": spec.layers, "rotary_emb_base": 10000,
            "rotary_pct": spec.rotary_pct, "tie_word_embeddings": False, "torch_dtype": "float16",
            "transformers_version": "4.21.0.dev0", "use_cache": True, "vocab_size": spec.vocab_rows,
        }
        if not spec.parallel_residual:
            config["use_parallel_residual"] = False
    else:
        config["architectures"] = ["GPTNeoXForCausalLM"]
        assert "rope_parameters" in config and "rotary_pct" not in config, "transformers 5 schema expected"
    (out / "config.json").write_text(json.dumps(config, indent=2))

    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[spec.dtype]
    state = {k: v.to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    if spec.schema == "tf4":  # published checkpoints name the output head embed_out; transformers 5 saves lm_head
        state["embed_out.weight"] = state.pop("lm_head.weight")
    if spec.legacy_buffers:
        head_dim = spec.hidden // spec.heads
        rot = int(head_dim * spec.rotary_pct)
        for i in range(spec.layers):
            p = f"gpt_neox.layers.{i}.attention."
            state[p + "bias"] = torch.tril(torch.ones(spec.ctx, spec.ctx, dtype=torch.bool)).view(1, 1, spec.ctx,
                                                                                                  spec.ctx)
            state[p + "masked_bias"] = torch.tensor(-1e9)
            state[p + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    _save(out, state, spec.weights)
    return out


def _save(out: Path, state: dict, fmt: str) -> None:
    import torch
    from safetensors.torch import save_file

    names = list(state)
    sharded = fmt.endswith("-sharded")
    groups = [names[: len(names) // 2], names[len(names) // 2:]] if sharded else [names]
    safetensors = fmt.startswith("safetensors")
    weight_map = {}
    for k, group in enumerate(groups, 1):
        if safetensors:
            file = f"model-{k:05d}-of-{len(groups):05d}.safetensors" if sharded else "model.safetensors"
            save_file({n: state[n] for n in group}, str(out / file), metadata={"format": "pt"})
        else:
            file = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin" if sharded else "pytorch_model.bin"
            torch.save({n: state[n] for n in group}, out / file)
        weight_map.update({n: file for n in group})
    if sharded:
        index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
