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


def _describe(pre: object) -> str:
    if not pre:
        return "none"
    if not isinstance(pre, dict):
        return f"{type(pre).__name__} {str(pre)[:40]!r}"
    if pre.get("type") == "Sequence" and isinstance(pre.get("pretokenizers"), list):
        return "Sequence[" + ", ".join(_describe(p) for p in pre["pretokenizers"]) + "]"
    opts = ", ".join(f"{k}={v}" for k, v in pre.items() if k != "type")
    return f"{pre.get('type')}({opts})"


def _is_gpt2_bytelevel(p: object) -> bool:
    return (isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True)
            and not p.get("add_prefix_space", False))


def choose_pre(tokenizer: dict) -> str:
    """Name llama.cpp's pre-tokenizer that splits text as this tokenizer.json's pre_tokenizer does."""
    pre = tokenizer.get("pre_tokenizer")
    if _is_gpt2_bytelevel(pre):
        return "gpt-2"  # the GPT-2 regex, then bytes
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers")
        if (isinstance(parts, list) and len(parts) == 2 and isinstance(parts[0], dict)
                and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and _is_gpt2_bytelevel(parts[1])):
            # Every digit isolated, then the GPT-2 regex: llama.cpp's "starcoder" runs exactly "\p{N}" then GPT-2.
            return "starcoder"
    raise TokenizerError(f"pre-tokenizer {_describe(pre)} has no llama.cpp equivalent; malhae supports "
                         "ByteLevel and Digits(individual_digits)+ByteLevel (the Polyglot-Ko tokenizers)")


def _special_id(name: str | None, vocab: dict[str, int]) -> int | None:
    return vocab.get(name) if name else None


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_ids(tok: dict, model: dict, path: Path) -> tuple[dict[str, int], dict[int, bool], list[str]]:
    """Every token's id (model.vocab, then added_tokens), which ids are added tokens and whether special, and the
    added tokens' texts. A hand-edited or truncated file gets one line naming the field, never a KeyError."""
    vocab = model.get("vocab") or {}
    if not isinstance(vocab, dict):
        raise _bad(path, "model.vocab", f"a {type(vocab).__name__}", 'an object of token → id ({"a": 0, …})')
    ids: dict[str, int] = {}
    for text, i in vocab.items():
        if not _is_id(i):
            raise _bad(path, f"model.vocab[{_show(text)}]", _show(i), "a token id (a whole number ≥ 0)")
        ids[text] = i
    added_tokens = tok.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise _bad(path, "added_tokens", f"a {type(added_tokens).__name__}", 'a list of {"id": …, "content": …}')
    specials: list[str] = []
    special_flags: dict[int, bool] = {}
    for n, added in enumerate(added_tokens):
        if not isinstance(added, dict) or not _is_id(added.get("id")) or not isinstance(added.get("content"), str):
            raise _bad(path, f"added_tokens[{n}]", _show(added),
                       'an object with "id" (a whole number ≥ 0) and "content" (text)')
        ids[added["content"]] = added["id"]
        special_flags[added["id"]] = bool(added.get("special", True))
        specials.append(added["content"])
    return ids, special_flags, specials


def _merges(model: dict, path: Path) -> list[str]:
    """model.merges as llama.cpp stores them, "a b"; tokenizer.json writes each as that text or as ["a", "b"]."""
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise _bad(path, "model.merges", f"a {type(merges).__name__}", "a list of merges")
    out = []
    for n, m in enumerate(merges):
        if not (isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m))):
            raise _bad(path, f"model.merges[{n}]", _show(m), '"a b" or ["a", "b"]')
        out.append(m if isinstance(m, str) else " ".join(m))
    return out


def _bad(path: Path, field: str, shown: str, expected: str) -> TokenizerError:
    return TokenizerError(f"{path}: {field} is {shown}; expected {expected}; download the model's tokenizer.json "
                          "again")


def _show(value: object) -> str:
    """A JSON value as the file has it, cut short: the message stays one readable line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "…"


def read_vocab(model_dir: Path, n_vocab: int, config_ids: dict[str, int | None]) -> Vocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no tokenizer.json in {model_dir}: malhae needs the model's fast tokenizer file "
                             "(download tokenizer.json from the model's repository)")
    tok = files.parse_json(files.read_user_bytes(path, "", limit=MAX_JSON), str(path), "download it again")
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

    ids, special_flags, specials = _token_ids(tok, model, path)
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

    merges = _merges(model, path)

    # Special token names: tokenizer_config.json / special_tokens_map.json; ids from config.json win when present.
    names: dict[str, str | None] = {}
    tc: dict = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / extra
        if p.is_file():
            data = files.parse_json(files.read_user_bytes(p, "", limit=MAX_JSON), str(p), "download it again")
            if not isinstance(data, dict):
                raise TokenizerError(f"{p} is not a JSON object; download it again")
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                names.setdefault(key, _token_content(data.get(key)))
            tc = data if extra == "tokenizer_config.json" else tc

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
