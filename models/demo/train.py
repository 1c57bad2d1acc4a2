"""Train malhae's demo model end to end: tokenizer, a tiny Polyglot-Ko-shaped GPT-NeoX, HF checkpoint, GGUF.

    python models/demo/train.py [--hf-out models/demo/hf] [--gguf-out models/malhae-demo-ko-f16.gguf] [--steps N]
    python models/demo/train.py --convert-only    # after a converter change: the same weights, converted again

Why this exists: the app has to work offline out of the box, and no real Polyglot-Ko checkpoint (2.6 GB and up) can be
shipped with it or downloaded where it runs. So the project trains its own: the same architecture (GPT-NeoX with
parallel residual, partial rotary, GELU, untied head, the family's special tokens and digit-splitting byte-level BPE),
small enough (~9 M parameters, an F16 GGUF under 20 MB) to commit, trained here on CPU in minutes on text that anyone
may copy — the Constitution of the Republic of Korea, National Assembly bills (Korean Copyright Act Art. 7) and Q&A
lines the project wrote (models/demo/data/qa.txt). It proves the whole path — HF checkpoint → converter → llama.cpp —
on a model whose outputs mean something, which random-weight test checkpoints cannot.

Two bills (HELD_OUT) are never trained on, not even by the tokenizer: perplexity on them is the honest measure the
tests and the quantization benchmark use. Choices that the loss curves on this corpus decided (see MODEL_CARD.md):
- the constitution (×20) and the Q&A (×8) are oversampled so that the model memorises the opening articles, which
  the tests check by greedy decoding, and most of the Q&A;
- half of the Q&A copies carry the system line the app puts before a conversation with a base model, so the demo
  answers in the frame `malhae chat` and `ask` really send as well as in the bare one;
- every third step trains on 32-token windows instead of 512-token ones (same tokens): a 512-token window has only a
  handful of positions with almost no context, so without them the model could recite article 1 only when it had
  read the text before it, not from a bare prompt;
- a tenth of the words in each training copy are encoded as two halves (Segmenter): with a vocabulary that holds
  nearly every training word whole, this cut the held-out perplexity about fivefold, because unseen words can only
  appear in pieces. It is the only regulariser needed: dropout (0.1, 0.2) or more copies of the bills made the
  held-out perplexity no better and the Q&A far less memorised.
Everything is seeded and runs on CPU; bf16 autocast roughly doubles the speed of the matmuls on CPUs with
AMX/AVX512-BF16 while the weights and the optimizer stay in float32. The results are reproducible for a given
machine and thread count (the default is one thread; see --threads). Not run by CI: the checkpoint and the GGUF it
writes are committed, and tests/test_demo_model.py checks that they match each other and what they can do.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # app and convert, when run as a script from anywhere

from malhae.convert import corpus  # noqa: E402

CORPUS = ROOT / "models" / "data" / "ko-public-domain"
QA = Path(__file__).resolve().parent / "data" / "qa.txt"
HELD_OUT = tuple(p.name for p in corpus.manifest().held_out)  # named once, in models/calibration.toml
SPECIALS = ["<|endoftext|>", "<|sep|>", "<|acc|>", "<|rrn|>", "<|tell|>"]
EOT = "<|endoftext|>"
PROMPT = "대한민국의 주권은"
GGUF_NAME = "malhae-demo-ko"  # general.name in the GGUF (else the converter names it after the folder, "hf")


@dataclass(frozen=True)
class Corpus:
    constitution: str
    bills: list[str]  # the training bills
    dialogues: list[str]  # Q&A dialogues, each `사용자: …\n어시스턴트: …` turns
    held_out: str


def load_corpus() -> Corpus:
    bills = sorted((CORPUS / "bills").glob("*.txt"))
    missing = [name for name in HELD_OUT if not (CORPUS / "bills" / name).is_file()]
    if missing:
        raise SystemExit(f"held-out bills missing from {CORPUS / 'bills'}: {missing}")
    dialogues = [d.strip() for d in QA.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return Corpus(
        constitution=(CORPUS / "constitution.txt").read_text(encoding="utf-8"),
        bills=[p.read_text(encoding="utf-8") for p in bills if p.name not in HELD_OUT],
        dialogues=dialogues,
        held_out=held_out_text(),
    )


def held_out_text() -> str:
    """The evaluation text: the two held-out bills, joined as the tests and the benchmark join them."""
    return corpus.held_out_text()


def base_frame() -> str:
    """The system line the app puts before a conversation with a base model (models/templates.toml, "base").

    Some Q&A copies are trained under it so that the demo answers in the frame `malhae chat`/`ask` really send;
    the other copies stay bare, as qa.txt has them, for frames without a system line."""
    from malhae.runtime.templates import get

    base = get("base")
    return base.system_format.format(system=base.system) if base.system and base.system_format else ""


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with the family's pre-tokenizer (digits one by one, then GPT-2's ByteLevel) and specials 0-4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS))), "special tokens must be ids 0-4"
    return tok


def write_tokenizer(tok, out: Path, ctx: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = special | {"model_max_length": ctx, "tokenizer_class": "PreTrainedTokenizerFast",
                        "additional_special_tokens": SPECIALS[1:]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def model_config(n_rows: int, args: argparse.Namespace):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=n_rows, hidden_size=args.hidden, num_attention_heads=args.heads,
                         num_hidden_layers=args.layers, intermediate_size=4 * args.hidden, max_position_embeddings=1024,
                         rotary_pct=args.rotary_pct, rotary_emb_base=10000, use_parallel_residual=True,
                         layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         hidden_act="gelu", initializer_range=0.02, hidden_dropout=args.dropout,
                         attention_dropout=args.dropout)


class Segmenter:
    """Each training document as BPE ids: canonically, or with some words split in two (subword regularisation).

    A BPE vocabulary learnt from ~180 kB of text holds nearly every training word whole, so canonical encoding never
    shows the model a word spelt in pieces — yet that is all an unseen word can be, and the held-out bills are full of
    them. Encoding a fraction of the words as two canonically encoded halves (a seeded, simpler cousin of
    BPE-dropout, Provilkov et al. 2020) teaches the model to read and predict such pieces. The shipped tokenizer is
    untouched: only the training stream varies.
    """

    def __init__(self, tok, texts: list[str], split_p: float):
        self.tok = tok
        self.split_p = split_p
        # tokenizers encodes pre-token by pre-token, so the concatenated per-word encodings are the canonical ids
        self.words = [[w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)] for text in texts]
        self.cache: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            assert self.encode(i, None) == tok.encode(text, add_special_tokens=False).ids

    def ids(self, piece: str) -> list[int]:
        if piece not in self.cache:
            self.cache[piece] = [t.id for t in self.tok.model.tokenize(piece)]
        return self.cache[piece]

    def encode(self, i: int, rng: random.Random | None) -> list[int]:
        out: list[int] = []
        for w in self.words[i]:
            if rng is not None and len(w) > 1 and rng.random() < self.split_p:
                k = rng.randrange(1, len(w))
                out += self.ids(w[:k]) + self.ids(w[k:])
            else:
                out += self.ids(w)
        return out


def blocks(seg: Segmenter, copies: list[int], block: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless training windows of block+1 tokens: each epoch shuffles the (oversampled) documents, encodes every
    copy afresh (different words split each time), joins them with <|endoftext|> and cuts the stream from a random
    offset, so a passage lands at a different window position each time it is seen."""
    eot = SPECIALS.index(EOT)
    while True:
        order = [i for i, n in enumerate(copies) for _ in range(n)]
        rng.shuffle(order)
        stream: list[int] = []
        for i in order:
            stream += seg.encode(i, rng) + [eot]
        start = rng.randrange(block)
        windows = [stream[s:s + block + 1] for s in range(start, len(stream) - block, block + 1)]
        rng.shuffle(windows)
        yield from windows


def held_out_windows(tokens: list[int], n_ctx: int) -> torch.Tensor:
    n = len(tokens) // n_ctx
    return torch.tensor(tokens[: n * n_ctx]).view(n, n_ctx)


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor) -> float:
    """Mean NLL over the second half of each window — what llama-perplexity (and app.eval.perplexity) score, so that
    exp(this) is directly comparable with the F16 GGUF's perplexity."""
    model.eval()
    n_ctx = windows.shape[1]
    first = n_ctx // 2
    total, count = 0.0, 0
    for w in windows.split(4):
        logits = model(input_ids=w).logits.float()
        nll = F.cross_entropy(logits[:, first:n_ctx - 1].reshape(-1, logits.shape[-1]),
                              w[:, first + 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += w.shape[0] * (n_ctx - 1 - first)
    model.train()
    return total / count


@torch.no_grad()
def greedy_probe(model, tok, n_new: int = 16) -> str:
    """The greedy continuation of PROMPT, from nothing but the prompt — how the tests (and a user) will see it."""
    model.eval()
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    for _ in range(n_new):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    model.train()
    return tok.decode(ids[len(tok.encode(PROMPT, add_special_tokens=False).ids):])


def lr_at(step: int, args: argparse.Namespace) -> float:
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    corpus = load_corpus()
    framed = [base_frame() + d for d in corpus.dialogues] if args.qa_system_copies else []
    texts = [corpus.constitution, *corpus.bills, *corpus.dialogues, *framed]
    # training text only: what the held-out bills contain must not shape the vocabulary either
    tok = train_tokenizer(texts, args.vocab)
    n_tok = tok.get_vocab_size()
    n_rows = -(-n_tok // 128) * 128  # like the family: 30,003 tokenizer entries → 30,080 embedding rows
    cfg = model_config(n_rows, args)

    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    seg = Segmenter(tok, texts, args.split_words)
    docs = [seg.encode(i, None) for i in range(len(texts))]
    copies = ([args.constitution_copies] + [args.bill_copies] * len(corpus.bills)
              + [args.qa_copies - args.qa_system_copies] * len(corpus.dialogues)
              + [args.qa_system_copies] * len(framed))
    held = held_out_windows(encode(corpus.held_out), args.block)
    epoch_tokens = sum(len(d) * c for d, c in zip(docs, copies, strict=True))

    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {n_tok} entries → {n_rows} embedding rows; model: hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, ff {4 * args.hidden}, rotary {args.rotary_pct}; {n_params:,} parameters", flush=True)
    print(f"data: constitution {len(docs[0])} tokens × {args.constitution_copies}, {len(corpus.bills)} bills "
          f"{sum(len(d) for d in docs[1:1 + len(corpus.bills)])} tokens × {args.bill_copies}, "
          f"{len(corpus.dialogues)} dialogues "
          f"{sum(len(d) + 1 for d in docs[1 + len(corpus.bills):1 + len(corpus.bills) + len(corpus.dialogues)])} "
          f"tokens × {args.qa_copies} ({args.qa_system_copies} of them under the app's system line); "
          f"{epoch_tokens} tokens an epoch; held out: {held.numel()} tokens in {held.shape[0]} windows", flush=True)
    steps_per_epoch = epoch_tokens / (args.batch * (args.block + 1))
    print(f"training: {args.steps} steps of {args.batch}×{args.block} tokens (≈{args.steps / steps_per_epoch:.1f} "
          f"epochs), lr {args.lr}, seed {args.seed}, {args.threads} threads", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), fused=True)
    long_windows = blocks(seg, copies, args.block, random.Random(args.seed))
    short_windows = blocks(seg, copies, args.short_block, random.Random(args.seed + 1))
    n_short = args.batch * args.block // args.short_block  # same tokens a step either way
    print(f"{'step':>6} {'train':>8} {'held-out':>9} {'ppl':>9} {'seconds':>8}  greedy({PROMPT})", flush=True)
    held_loss = held_out_loss(model, held)
    print(f"{0:>6} {'':>8} {held_loss:9.4f} {math.exp(held_loss):9.1f} {time.perf_counter() - wall_start:8.0f}  "
          f"{greedy_probe(model, tok)!r}", flush=True)
    train_start = time.perf_counter()
    recent: list[float] = []
    train_loss = float("nan")
    for step in range(args.steps):
        short = args.short_every > 0 and step % args.short_every == args.short_every - 1
        batch = torch.tensor([next(short_windows) for _ in range(n_short)] if short
                             else [next(long_windows) for _ in range(args.batch)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            train_loss = sum(recent) / len(recent)
            recent.clear()
            held_loss = held_out_loss(model, held)
            print(f"{step + 1:>6} {train_loss:8.4f} {held_loss:9.4f} {math.exp(held_loss):9.1f} "
                  f"{time.perf_counter() - wall_start:8.0f}  {greedy_probe(model, tok)!r}", flush=True)
    train_seconds = time.perf_counter() - train_start

    args.hf_out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tok, args.hf_out, cfg.max_position_embeddings, args.rotary_pct)
    print(f"wrote {args.hf_out}", flush=True)
    summary = convert_and_check(args, corpus.held_out)
    summary |= {"parameters": n_params, "tokenizer_entries": n_tok, "embedding_rows": n_rows,
                "train_seconds": round(train_seconds), "total_seconds": round(time.perf_counter() - wall_start),
                "final_train_loss": round(train_loss, 4), "final_held_out_loss": round(held_loss, 4),
                "steps": args.steps, "seed": args.seed, "threads": args.threads}
    print(json.dumps(summary, ensure_ascii=False, indent=1), flush=True)


def save_checkpoint(model, tok, out: Path, ctx: int, rotary_pct: float) -> None:
    """F16 safetensors and the config transformers writes, plus the keys the published polyglot-ko configs carry
    (`rotary_pct`, `rotary_emb_base`), so the checkpoint reads like the family's to tools that only know those."""
    model.to(torch.float16).save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)  # the defaults it holds are in config.json already
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    rope = config["rope_parameters"]
    assert rope["partial_rotary_factor"] == rotary_pct
    config |= {"rotary_pct": rotary_pct, "rotary_emb_base": rope["rope_theta"]}
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n", encoding="utf-8")
    write_tokenizer(tok, out, ctx)


def convert_and_check(args: argparse.Namespace, held_out: str) -> dict:
    """The project's own converter makes the shipped GGUF; llama.cpp then shows it generates and scores as trained."""
    from malhae.convert import pipeline
    from malhae.eval.perplexity import perplexity
    from malhae.runtime.llama import Context, Model

    out = args.gguf_out
    # the base template written in (tokenizer.chat_template), so other GGUF runners frame prompts as malhae does
    result = pipeline.convert(args.hf_out, "f16", out, force=True, name=GGUF_NAME, template="base")
    if result.size > 20 * 10**6:
        q8 = out.with_name(out.name.replace("-f16", "-q8_0"))
        print(f"{out.name} is {result.size / 1e6:.1f} MB, over 20 MB: writing {q8.name} instead", flush=True)
        out.unlink()
        result = pipeline.convert(args.hf_out, "q8_0", q8, force=True, name=GGUF_NAME, template="base")
        out = q8
    with Model(out) as model, Context(model, n_ctx=64) as ctx:
        new = ctx.greedy(model.tokenize(PROMPT), 20)
        text = b"".join(model.token_bytes(t) for t in new).decode("utf-8", "replace")
    ppl, scored = perplexity(out, held_out)
    print(f"{out}: {result.size / 1e6:.2f} MB; greedy: {PROMPT}{text!r}; held-out perplexity {ppl:.2f} "
          f"({scored} tokens)", flush=True)
    return {"gguf": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out), "gguf_bytes": result.size,
            "greedy": PROMPT + text, "held_out_ppl": round(ppl, 3), "held_out_tokens_scored": scored}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-out", type=Path, default=ROOT / "models" / "demo" / "hf")
    p.add_argument("--gguf-out", type=Path, default=ROOT / "models" / "malhae-demo-ko-f16.gguf")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--short-block", type=int, default=32,
                   help="window length of the short-window steps (the same number of tokens in more windows)")
    p.add_argument("--short-every", type=int, default=3, help="every Nth step uses short windows (0: never)")
    p.add_argument("--split-words", type=float, default=0.1,
                   help="share of words a training copy encodes as two halves (subword regularisation; 0: never)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout while training")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rotary-pct", type=float, default=0.5)
    p.add_argument("--vocab", type=int, default=8000, help="BPE target size (the corpus may support fewer)")
    p.add_argument("--constitution-copies", type=int, default=20)
    p.add_argument("--bill-copies", type=int, default=1)
    p.add_argument("--qa-copies", type=int, default=8)
    p.add_argument("--qa-system-copies", type=int, default=4,
                   help="how many of the Q&A copies carry the app's system line in front")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: on the 2-core machine this was trained on, a second thread gained under 30 % when the
    # machine was idle and made every step 10× slower whenever another process was busy (OpenMP threads spin-wait).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (slower)")
    p.add_argument("--convert-only", action="store_true",
                   help="skip training: convert the checkpoint already in --hf-out again (a converter change)")
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    if options.convert_only:
        print(json.dumps(convert_and_check(options, load_corpus().held_out), ensure_ascii=False, indent=1))
    else:
        train(options)
