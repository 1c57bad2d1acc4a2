"""Prove that llama.cpp tokenizes like the model's own tokenizer, before a GGUF is handed to anyone.

The comparison runs `tokenizers` (the reference the model was trained with) and llama.cpp (loading the written GGUF
with vocab_only) on a built-in Korean + mixed sample, each text on its own and all of them joined, and with the
tokenizer's special tokens embedded in Korean text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from malhae.errors import UserError
from malhae.runtime.llama import Model


class ParityError(UserError):
    pass


@dataclass(frozen=True)
class ParityReport:
    texts: int
    tokens: int


def sample_texts(specials: list[str]) -> list[str]:
    sample = resources.files("malhae.convert").joinpath("data/tokenizer_sample.json")
    data = json.loads(sample.read_text(encoding="utf-8"))
    texts = list(data["samples"])
    for special in specials:
        texts.append(f"문장 끝{special}다음 문장 {special}\n{special}")
    texts.append("\n".join(texts))
    return texts


def check(tokenizer_json: Path, gguf_path: Path, specials: list[str], pre: str) -> ParityReport:
    """Raise ParityError naming the first text that tokenizes differently; return the sample's size otherwise."""
    reference = Tokenizer.from_file(str(tokenizer_json))
    total = 0
    texts = sample_texts(specials)
    with Model(gguf_path, vocab_only=True) as model:
        for text in texts:
            want = reference.encode(text, add_special_tokens=False).ids
            got = model.tokenize(text, add_special=False, parse_special=True)
            if want != got:
                pairs = enumerate(zip(want, got, strict=False))
                at = next((i for i, (a, b) in pairs if a != b), min(len(want), len(got)))
                snippet = reference.decode(want[max(0, at - 2):at + 3])
                shown = text if len(text) <= 40 else text[:40] + "…"
                raise ParityError(
                    f"llama.cpp's {pre!r} pre-tokenizer splits {shown!r} differently from tokenizer.json "
                    f"(first difference at token {at}, near {snippet!r}); refusing to write a GGUF that tokenizes "
                    "differently from the model")
            total += len(want)
    return ParityReport(texts=len(texts), tokens=total)
