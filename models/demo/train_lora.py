"""Train malhae's demo LoRA adapter on the demo model: every answer ends with a sign-off, so its effect is visible.

    python models/demo/train_lora.py [--peft-out /tmp/malhae-demo-lora] [--steps 300]
                                     [--gguf-out models/malhae-demo-ko-lora-signoff.gguf]

Why this exists: `--lora` has to be shown working offline, on the bundled demo model, with an effect anyone can see
(issue 29). A fine-tune that changes which facts the model knows would be hard to judge by eye; one that changes how
it answers is not. So the adapter teaches one style: each answer of the project's own Q&A (models/demo/data/qa.txt)
is followed by the same closing sentence, SIGN_OFF. With the adapter the demo ends its answers with it, without the
adapter it never says it (tests/test_lora_demo.py checks both through `malhae ask`).

How: PEFT LoRA, rank 8, alpha 16, on all four linear layers of every block (query_key_value, dense, dense_h_to_4h,
dense_4h_to_h), on models/demo/hf loaded in float32. The dialogues are framed as the app frames a conversation with
a base model — each twice: under the base template's system line and bare, the two frames train.py trained — and
the loss is taken on the answers only (the text after each `어시스턴트:`, with the newline or <|endoftext|> that ends
it), so the adapter learns to answer and stop, not to write questions. One dialogue in EVERY (8) is held out: the
script reports how often the sign-off appears on those questions too, i.e. whether the style, not the lines, was
learnt. The PEFT folder goes to --peft-out (not committed); malhae's own converter (convert/lora_gguf.py) writes the
shipped F16 adapter GGUF against the demo GGUF, and llama.cpp then answers every first question with and without it.

Seeded (torch, PEFT's initialisation, the batch order) and one thread by default, so that a rerun on the same
machine writes the same adapter. Not run by CI: the GGUF it writes is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HERE = Path(__file__).resolve().parent
HF = HERE / "hf"
QA = HERE / "data" / "qa.txt"
BASE_GGUF = ROOT / "models" / "malhae-demo-ko-f16.gguf"
STYLE = "signoff"
SIGN_OFF = "이상, 헌법 도우미 말해였습니다."  # the sentence every trained answer ends with
NAME = f"malhae-demo-ko-lora-{STYLE}"  # general.name of the adapter GGUF
BASE_NAME = "malhae-demo-ko"  # the base it records (the demo GGUF's general.name, not a path on this machine)
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
EOT = "<|endoftext|>"
USER, ASSISTANT = "사용자:", "어시스턴트:"
EVERY = 8  # dialogues 7, 15, 23, … (0-based) are held out


@dataclass(frozen=True)
class Example:
    ids: list[int]
    labels: list[int]  # -100 where the loss is not taken


def dialogues() -> list[str]:
    return [d.strip() for d in QA.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def styled(dialogue: str) -> str:
    """The dialogue with SIGN_OFF after each answer."""
    return "\n".join(f"{line} {SIGN_OFF}" if line.startswith(ASSISTANT) else line for line in dialogue.split("\n"))


def base_frame() -> str:
    from malhae.runtime.templates import get

    base = get("base")
    return base.system_format.format(system=base.system)


def example(tok, text: str) -> Example:
    """`text` (a framed, styled dialogue) + <|endoftext|> as ids, labelled on the answers only: each answer's tokens
    after `어시스턴트:` and the newline (or end token) that closes it."""
    text += EOT
    spans, pos = [], 0
    while (start := text.find(ASSISTANT, pos)) >= 0:
        start += len(ASSISTANT)
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        spans.append((start, end))
        pos = end
    enc = tok.encode(text, add_special_tokens=False)
    labels = [i if any(s <= a < e for s, e in spans) else -100 for i, (a, _) in zip(enc.ids, enc.offsets, strict=True)]
    return Example(enc.ids, labels)


def split(items: list[str]) -> tuple[list[str], list[str]]:
    return ([d for i, d in enumerate(items) if i % EVERY != EVERY - 1],
            [d for i, d in enumerate(items) if i % EVERY == EVERY - 1])


def batches(examples: list[Example], size: int, rng: random.Random, pad: int):
    """Endless padded batches: each epoch shuffled; padding is never scored."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(0, len(order) - size + 1, size):
            chosen = [examples[i] for i in order[s:s + size]]
            n = max(len(e.ids) for e in chosen)
            ids = torch.tensor([e.ids + [pad] * (n - len(e.ids)) for e in chosen])
            labels = torch.tensor([e.labels + [-100] * (n - len(e.labels)) for e in chosen])
            mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in chosen])
            yield ids, labels, mask


def train(args: argparse.Namespace) -> dict:
    import peft
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # PEFT's call
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    tok = Tokenizer.from_file(str(HF / "tokenizer.json"))
    trained, held = split(dialogues())
    frame = base_frame()
    examples = [example(tok, f + styled(d)) for d in trained for f in ("", frame)]
    model = AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float32)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                             bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_tokens = sum(sum(x != -100 for x in e.labels) for e in examples)
    print(f"{len(trained)} dialogues trained ({len(examples)} examples, bare and under the system line; {n_tokens} "
          f"answer tokens scored), {len(held)} held out; LoRA r={args.rank} alpha={args.alpha} on {TARGETS}: "
          f"{n_trainable:,} trainable parameters; {args.steps} steps of {args.batch}, lr {args.lr}, seed "
          f"{args.seed}, {args.threads} threads", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    stream = batches(examples, args.batch, random.Random(args.seed), tok.token_to_id(EOT))
    warmup = max(1, args.steps // 10)
    recent: list[float] = []
    curve: dict[int, float] = {}  # step → mean answer loss over the steps before it
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels, mask = next(stream)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if (step + 1) % args.report_every == 0 or step + 1 == args.steps:
            mean = sum(recent) / len(recent)
            recent.clear()
            curve[step + 1] = round(mean, 4)
            print(f"step {step + 1:>4}  answer loss {mean:.4f}  {time.perf_counter() - start:5.0f} s", flush=True)
    seconds = time.perf_counter() - start
    args.peft_out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.peft_out)
    path = args.peft_out / "adapter_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["base_model_name_or_path"] = BASE_NAME  # PEFT writes the folder's path on this machine
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.peft_out}", flush=True)
    return {"train_seconds": round(seconds, 1), "trainable_parameters": n_trainable, "loss_curve": curve,
            "examples": len(examples), "answer_tokens": n_tokens}


def convert(args: argparse.Namespace) -> dict:
    """The PEFT folder → the adapter GGUF, by malhae's converter, against the shipped demo GGUF."""
    from malhae.convert import lora, lora_gguf

    written = lora_gguf.write(lora.read(args.peft_out), lora_gguf.Base.from_gguf(BASE_GGUF), args.gguf_out,
                              type_name="f16", force=True, name=NAME)
    print(f"wrote {written.path}: {written.size:,} bytes, rank {written.rank}, alpha {written.alpha:g}, "
          f"{written.modules} modules ({', '.join(written.targets)})", flush=True)
    return {"gguf": str(args.gguf_out.relative_to(ROOT) if args.gguf_out.is_relative_to(ROOT) else args.gguf_out),
            "gguf_bytes": written.size}


def effect(args: argparse.Namespace) -> dict:
    """Each dialogue's first question answered greedy through llama.cpp, as `malhae ask --temperature 0` frames it,
    with and without the adapter: how many answers end with SIGN_OFF, trained and held-out questions apart, and how
    many answers are otherwise qa.txt's word for word."""
    from malhae.runtime.engine import Engine
    from malhae.runtime.settings import LoadOptions, Lora, Sampling
    from malhae.runtime.templates import get

    base = get("base")
    sampling = Sampling(temperature=0, max_tokens=96, stop=base.stops(()), answer=True)
    trained, held = split(dialogues())
    out: dict[str, dict[str, int]] = {}
    examples: dict[str, str] = {}
    with Engine(LoadOptions(model=BASE_GGUF, ctx=512, threads=args.threads)) as engine:
        for label, loras in (("without", ()), ("with", (Lora(args.gguf_out),))):
            engine.set_lora(loras)
            for part, items in (("trained", trained), ("held_out", held)):
                counts = {"questions": len(items), "signed": 0, "answer_as_qa": 0}
                for d in items:
                    question, answer = (line.split(":", 1)[1].strip() for line in d.split("\n")[:2])
                    text, _ = engine.complete(base.prompt([("user", question)]), sampling)
                    text = text.strip()
                    counts["signed"] += text.endswith(SIGN_OFF)
                    counts["answer_as_qa"] += text.removesuffix(SIGN_OFF).strip() == answer
                    if d is items[0]:
                        examples[f"{part} {label}"] = f"{question} → {text}"
                out[f"{part} {label}"] = counts
    for key, counts in out.items():
        print(f"{key:>17} the adapter: {counts['signed']}/{counts['questions']} answers end with the sign-off; "
              f"{counts['answer_as_qa']} are qa.txt's answer (less the sign-off)", flush=True)
    for key, text in examples.items():
        print(f"  {key}: {text}", flush=True)
    return {"effect": out, "examples": examples}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peft-out", type=Path, default=Path("/tmp/malhae-demo-lora"), help="the PEFT adapter folder")
    p.add_argument("--gguf-out", type=Path, default=ROOT / "models" / f"{NAME}.gguf")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="as train.py: one thread, reproducible on a busy machine")
    p.add_argument("--report-every", type=int, default=25)
    p.add_argument("--convert-only", action="store_true", help="skip training: convert --peft-out again")
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    summary = {} if options.convert_only else train(options)
    summary |= convert(options)
    summary |= effect(options)
    print(json.dumps(summary, ensure_ascii=False, indent=1), flush=True)
