"""Compare a converted GGUF's logits (through llama.cpp) with the original checkpoint's (through transformers).

A wrong QKV order, rotary size or residual layout still loads and runs; only logits show it. This is the same check
the test suite runs, offered to users for their own models (`malhae convert --verify`).

Pass criteria, by type:
- f32: max |Δlogit| ≤ 1e-3 · max(1, max |logit|): absolute for small logits, relative to the largest logit for
  trained models whose logits reach tens (f32 sums in a different order still differ in the last bits).
- f16, bf16: max |Δlogit| ≤ 2e-2 · max(1, max |logit|), and the top-1 token is the same at every position except
  near-ties: positions where the reference's margin between the two tokens is within 2·max |Δ| (llama.cpp's f16
  matmul rounds activations to f16, so a tie in the reference can fall either way; random-weight models have many).
- quantized types: reported, not judged (they are lossy by design; see `malhae eval compare`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from malhae.errors import UserError
from malhae.runtime.interrupts import Interrupts
from malhae.runtime.llama import Context, Model
from malhae.runtime.settings import LoadOptions

F32_TOLERANCE = 1e-3
F16_TOLERANCE = 2e-2


@dataclass(frozen=True)
class Row:
    prompt: str
    tokens: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agree: int
    near_ties: int  # disagreements where the reference's own margin is within 2·max |Δ|


@dataclass(frozen=True)
class Report:
    type: str
    rows: list[Row]
    criterion: str
    passed: bool | None  # None: informational only

    @property
    def positions(self) -> int:
        return sum(r.tokens for r in self.rows)


def default_prompts() -> list[str]:
    data = resources.files("malhae.convert").joinpath("data/verify_prompts.json").read_text(encoding="utf-8")
    return json.loads(data)["prompts"]


def hf_logits(src: Path, token_lists: list[list[int]], merge: list | None = None,
              adapter: Path | None = None) -> list[np.ndarray]:
    """Logits from transformers in float32 (the reference), one array per prompt; `merge` (convert.merge.Spec
    values): PEFT adapters merged first, by PEFT itself (merge_and_unload), each at its scale; `adapter`: a PEFT
    folder applied unmerged, as PEFT runs it."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError("--verify compares with transformers: pip install 'malhae[verify]' "
                        "(installs torch and transformers)") from e
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except TypeError:  # transformers 4 calls it torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    for spec in merge or ():
        model = _peft_merged(model, spec)
    if adapter is not None:
        peft, _ = _peft()
        model = peft.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for tokens in token_lists:
            out.append(model(torch.tensor([tokens])).logits[0].float().numpy())
    return out


def _peft_merged(model, spec):
    """`model` with the adapter in spec.folder merged by PEFT at spec.scale (B's weights and bias times the scale:
    PEFT's own scale then applies as usual, inside DoRA's norm too)."""
    peft, torch = _peft()
    peft_model = peft.from_pretrained(model, spec.folder)
    if spec.scale != 1:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_B." in name or ".lora_embedding_B." in name:
                    p.mul_(spec.scale)
    return peft_model.merge_and_unload()


def _peft():
    """(peft.PeftModel, torch), or the one line saying what to install."""
    try:
        import torch
        from peft import PeftModel
    except ImportError as e:
        raise UserError("--verify of a LoRA adapter compares with PEFT itself: pip install peft") from e
    return PeftModel, torch


def gguf_logits(path: Path, token_lists: list[list[int]], threads: int | None = None,
                lora: tuple = ()) -> list[np.ndarray]:
    n_ctx = max(len(t) for t in token_lists) + 8
    options = LoadOptions(ctx=n_ctx, batch=n_ctx, threads=threads, lora=lora)
    # Ctrl-C while llama.cpp loads or evaluates: a flag that stops the decode, raised here (app.runtime.interrupts)
    with (Interrupts() as interrupted, Model(path) as model,
          Context(model, options, precise=True, abort=interrupted) as ctx):
        return [ctx.logits(tokens) for tokens in token_lists]


def compare(type_name: str, prompts: list[str], tokens: list[list[int]], ref: list[np.ndarray],
            got: list[np.ndarray]) -> Report:
    rows = []
    for prompt, toks, a, b in zip(prompts, tokens, ref, got, strict=True):
        b = b[:, : a.shape[1]]  # same rows: the GGUF has exactly the embedding's rows
        diff = float(np.abs(a - b).max())
        want, got_top = a.argmax(-1), b.argmax(-1)
        positions = np.arange(len(want))
        margins = a[positions, want] - a[positions, got_top]  # 0 where they agree
        disagree = want != got_top
        rows.append(Row(prompt, len(toks), diff, float(np.abs(a).max()), int((~disagree).sum()),
                        int((disagree & (margins <= 2 * diff)).sum())))
    if type_name == "f32":
        ok = all(r.max_abs_diff <= F32_TOLERANCE * max(1.0, r.max_abs_logit) for r in rows)
        return Report(type_name, rows, "max |Δ| ≤ 1e-3 × max(1, max |logit|)", ok)
    if type_name in ("f16", "bf16"):
        ok = all(r.max_abs_diff <= F16_TOLERANCE * max(1.0, r.max_abs_logit)
                 and r.top1_agree + r.near_ties == r.tokens for r in rows)
        return Report(type_name, rows, "max |Δ| ≤ 2e-2 × max(1, max |logit|) and top-1 identical except near-ties",
                      ok)
    return Report(type_name, rows, "informational (lossy type)", None)


def verify_adapter(src: Path, peft_folder: Path, base_gguf: Path, adapter_gguf: Path, type_name: str,
                   threads: int | None = None) -> Report:
    """A converted adapter on its base GGUF through llama.cpp against transformers + PEFT running the adapter on the
    base's checkpoint, judged by the base's type (`type_name`: f32 and f16 judged, quantized types reported)."""
    from malhae.runtime.settings import Lora

    prompts = default_prompts()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokens = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    ref = hf_logits(src, tokens, adapter=peft_folder)
    got = gguf_logits(base_gguf, tokens, threads, lora=(Lora(adapter_gguf),))
    return compare(type_name, prompts, tokens, ref, got)


def adapter_reference(base, adapter) -> Path:
    """The Hugging Face checkpoint an adapter's --verify runs PEFT on: --base's folder, else the folder the adapter's
    config names; checked before the adapter is written (`base`: a convert.lora_gguf.Base)."""
    if base.is_checkpoint:
        return base.path
    named = Path(adapter.config.base).expanduser() if adapter.config.base else None
    if named is not None and (named / "config.json").is_file():
        return named
    raise UserError(f"--verify runs the adapter through PEFT on the base's Hugging Face checkpoint, and the adapter "
                    f"names {adapter.config.base or 'no base'}, which is not a folder here; give --base FOLDER (the "
                    "checkpoint: malhae converts it to a temporary F16 for the comparison)")


def verify_written(base, adapter, written: Path, reference: Path, threads: int | None = None) -> Report:
    """An adapter just written, on its base GGUF (a temporary F16 of `reference` when the base given was the
    checkpoint itself) against PEFT on `reference`, judged by the base GGUF's type."""
    from malhae import files
    from malhae.convert import pipeline
    from malhae.runtime.gguf_info import read_info

    if not base.is_checkpoint:
        kind = (read_info(base.path).file_type or "q").lower()
        return verify_adapter(reference, adapter.folder, base.path, written, kind, threads)
    with files.partial(written, "verify-base") as staged:
        pipeline.convert(reference, "f16", staged, force=True, threads=threads)
        return verify_adapter(reference, adapter.folder, staged, written, "f16", threads)


def verify(src: Path, gguf_path: Path, type_name: str, prompts: list[str] | None = None,
           threads: int | None = None, merge: list | None = None) -> Report:
    prompts = prompts or default_prompts()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokens = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    ref = hf_logits(src, tokens, merge)
    got = gguf_logits(gguf_path, tokens, threads)
    return compare(type_name, prompts, tokens, ref, got)
