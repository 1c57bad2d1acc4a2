"""Turn a Hugging Face byte-level BPE tokenizer.json into llama.cpp's "gpt2" vocabulary.

llama.cpp does not run the HF pre-tokenizer; it runs its own, chosen by the name in `tokenizer.ggml.pre`. So the name
is decided from the tokenizer.json structure here, and then proven by comparing token ids (see parity.py): a GGUF that
tokenizes differently from the model's training would quietly ruin every answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gguf import TokenType

from malhae import files
from malhae.errors import UserError

MAX_JSON = 1 << 28  # the largest tokenizer.json files are tens of MB; 256 MB is no tokenizer's


class TokenizerError(UserError):
    pass


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    n_real: int  # entries the tokenizer defines; the rest up to the embedding rows are placeholders
    specials: list[str] = field(default_factory=list)  # added tokens, for the parity sample


def _describe(pre: dict | None) -> str:
    if not pre:
        return "none"
    if pre.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(p) for p in pre.get("pretokenizers", [])) + "]"
    opts = ", ".join(f"{k}={v}" for k, v in pre.items() if k != "type")
    return f"{pre.get('type')}({opts})"


def _is_gpt2_bytelevel(p: dict) -> bool:
    return (p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False))


def choose_pre(tokenizer: dict) -> str:
    """Name llama.cpp's pre-tokenizer that splits text as this tokenizer.json's pre_tokenizer does."""
    pre = tokenizer.get("pre_tokenizer")
    if pre and _is_gpt2_bytelevel(pre):
        return "gpt-2"  # the GPT-2 regex, then bytes
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and _is_gpt2_bytelevel(parts[1])):
            # Every digit isolated, then the GPT-2 regex: llama.cpp's "starcoder" runs exactly "\p{N}" then GPT-2.
            return "starcoder"
    raise TokenizerError(f"pre-tokenizer {_describe(pre)} has no llama.cpp equivalent; malhae supports "
                         "ByteLevel and Digits(individual_digits)+ByteLevel (the Polyglot-Ko tokenizers)")


def _special_id(name: str | None, vocab: dict[str, int]) -> int | None:
    return vocab.get(name) if name else None


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_vocab(model_dir: Path, n_vocab: int, config_ids: dict[str, int | None]) -> Vocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no tokenizer.json in {model_dir}: malhae needs the model's fast tokenizer file "
                             "(download tokenizer.json from the model's repository)")
    raw = files.read_user_bytes(path, "", limit=MAX_JSON)
    try:
        tok = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); download it again") from e

    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("type"), str):
        raise TokenizerError(f"{path} is not a Hugging Face tokenizers file (no \"model\" with a \"type\"); "
                             "download the model's tokenizer.json again")
    if model["type"] != "BPE":
        raise TokenizerError(f"{path.name} is a {model['type']} tokenizer; malhae converts byte-level BPE "
                             "tokenizers (as Polyglot-Ko's)")
    if tok.get("normalizer"):
        normalizer = tok["normalizer"]
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise TokenizerError(f"{path.name} has a normalizer ({kind}), which llama.cpp does not apply; it cannot be "
                             "converted faithfully")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path.name} is not a plain byte-level BPE (byte_fallback or subword affixes)")
    pre = choose_pre(tok)

    ids: dict[str, int] = dict(model.get("vocab") or {})
    specials: list[str] = []
    special_flags: dict[int, bool] = {}
    for added in tok.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        special_flags[added["id"]] = bool(added.get("special", True))
        specials.append(added["content"])
    if not ids:
        raise TokenizerError(f"{path.name} has an empty vocabulary")
    if max(ids.values()) >= n_vocab:
        raise TokenizerError(f"{path.name} has token id {max(ids.values())} but the model has only {n_vocab} "
                             "embedding rows; tokenizer and weights do not belong together")

    tokens: list[str | None] = [None] * n_vocab
    for text, i in ids.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"  # rows the tokenizer never produces: kept so the tensors line up
            types.append(int(TokenType.UNUSED))
        elif i in special_flags:
            types.append(int(TokenType.CONTROL if special_flags[i] else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    # Special token names: tokenizer_config.json / special_tokens_map.json; ids from config.json win when present.
    names: dict[str, str | None] = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / extra
        if p.is_file():
            raw = files.read_user_bytes(p, "", limit=MAX_JSON)
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{p} is not valid JSON ({e}); download it again") from e
            if not isinstance(data, dict):
                raise TokenizerError(f"{p} is not a JSON object; download it again")
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                names.setdefault(key, _token_content(data.get(key)))
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}  # checked just above

    def pick(key: str) -> int | None:
        cid = config_ids.get(key)
        return cid if cid is not None and 0 <= cid < n_vocab else _special_id(names.get(f"{key}_token"), ids)

    return Vocab(
        tokens=tokens,  # type: ignore[arg-type]
        types=types,
        merges=merges,
        pre=pre,
        bos_id=pick("bos"),
        eos_id=pick("eos"),
        pad_id=pick("pad"),
        unk_id=_special_id(names.get("unk_token"), ids),
        add_bos=bool(tc.get("add_bos_token", False)),
        add_eos=bool(tc.get("add_eos_token", False)),
        n_real=len(ids),
        specials=specials,
    )
