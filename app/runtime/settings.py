"""Every setting a run takes, in one table: its type, its valid range, its built-in default, how a user writes it.

One table because the same values arrive from five places — command-line flags, config.toml, `/set` in chat, a saved
chat file and (later) server requests — and each used to check them its own way, so the copies disagreed (a
temperature of -1 was refused by /set and accepted by `ask`). `Sampling`'s defaults, the settings file's parser, the
/set command and every flag read this table; nothing else says what a valid temperature is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from malhae.errors import UserError
from malhae.runtime.kv import FLASH_ATTN, KV_TYPES

if TYPE_CHECKING:
    from malhae.runtime.grammar import Grammar

DEFAULT_MAX_CTX = 4096  # the family trains at 2048; larger contexts only cost memory
DEFAULT_BATCH = 512  # tokens per llama_decode (llama.cpp's default), capped by the context
DEFAULT_DRAFT_MAX = 16  # speculative decoding: the most drafted tokens one decode verifies (DraftLength picks fewer)
ONESHOT_MAX_TOKENS = 256  # complete and ask stop sooner than a chat answer unless told otherwise
# more threads than this only contend (llama.cpp's own cap is 512): 10,000 asked for made 10,001 threads and hung a
# 2-core machine
MAX_THREADS = 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # int, float or str (a word from a fixed list); gpu_layers is "auto" or an int
    default: object  # the built-in; None means "decided at run time" (a new seed, the model's context, the cores)
    ok: Callable[[object], bool]
    rule: str  # what a valid value is, as messages say it
    example: str
    table: str | None = "sampling"  # where config.toml keeps it: [sampling], or None for the top level
    none_words: tuple[str, ...] = ()  # words that mean None when typed (/set seed random)
    settable: bool = True  # changeable with /set in chat

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _table(*rows: Setting) -> dict[str, Setting]:
    return {row.name: row for row in rows}


SETTINGS: dict[str, Setting] = _table(
    Setting("temperature", float, 0.7, lambda v: 0 <= v <= 10, "a number from 0 to 10 (0 = always the likeliest "
            "token)", "0.7"),
    Setting("top_p", float, 0.95, lambda v: 0 < v <= 1, "a number above 0 and at most 1 (1 = off)", "0.95"),
    Setting("top_k", int, 40, lambda v: v >= 0, "a whole number, 0 or more (0 = off)", "40"),
    Setting("min_p", float, 0.05, lambda v: 0 <= v < 1, "a number from 0 up to 1 (0 = off)", "0.05"),
    Setting("repeat_penalty", float, 1.1, lambda v: 0 < v <= 10, "a number above 0 and at most 10 (1 = off)", "1.1"),
    # llama.cpp reads -1 as "the whole context"; malhae asks for the number
    # OpenAI's two penalties (server requests, config.toml): subtracted once for a token present in the window, and
    # once per occurrence; llama.cpp's penalties sampler applies them with repeat_penalty
    Setting("frequency_penalty", float, 0.0, lambda v: -2 <= v <= 2, "a number from -2 to 2 (0 = off)", "0.5",
            settable=False),
    Setting("presence_penalty", float, 0.0, lambda v: -2 <= v <= 2, "a number from -2 to 2 (0 = off)", "0.5",
            settable=False),
    Setting("repeat_last_n", int, 64, lambda v: v >= 0, "a whole number of tokens, 0 or more (0 = off)", "64",
            settable=False),
    Setting("max_tokens", int, 512, lambda v: v >= 1, "a whole number, 1 or more", "512"),
    Setting("seed", int, None, lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295, or random", "42",
            none_words=("random", "none")),
    Setting("ctx", int, None, lambda v: 16 <= v <= 1 << 20, "a whole number of tokens, 16 or more, or default",
            "4096", table=None, none_words=("default", "none", "auto")),
    Setting("threads", int, None, lambda v: 1 <= v <= MAX_THREADS, f"a whole number from 1 to {MAX_THREADS} (4 × "
            f"this machine's {os.cpu_count() or 1} logical CPUs)", str(min(8, MAX_THREADS)), table=None,
            settable=False),
    Setting("draft_max", int, DEFAULT_DRAFT_MAX, lambda v: 1 <= v <= 64, "a whole number from 1 to 64",
            "8", table=None, settable=False),
    Setting("gpu_layers", int, "auto", lambda v: v >= 0, '"auto" or a whole number of layers (0 = CPU only)',
            "auto", table=None, none_words=("auto",), settable=False),
    # the KV cache's types (app.runtime.kv): kv_cache sets K and V, kv_cache_k / kv_cache_v one of them (None: as
    # kv_cache); words, not numbers
    Setting("kv_cache", str, "f16", lambda v: v in KV_TYPES, f"one of {', '.join(KV_TYPES)}", "q8_0", table=None,
            settable=False),
    Setting("kv_cache_k", str, None, lambda v: v in KV_TYPES, f"one of {', '.join(KV_TYPES)}", "q8_0", table=None,
            settable=False),
    Setting("kv_cache_v", str, None, lambda v: v in KV_TYPES, f"one of {', '.join(KV_TYPES)}", "q8_0", table=None,
            settable=False),
    # the prompt cache on disk (app.runtime.prompt_cache): its size cap, in GiB; prompt_cache = false turns it off
    Setting("prompt_cache_max", float, 4.0, lambda v: 0 < v <= 65536, "a size in GiB above 0 and at most 65536",
            "8", table=None, settable=False),
    Setting("flash_attn", str, "auto", lambda v: v in FLASH_ATTN, f"one of {', '.join(FLASH_ATTN)}", "on",
            table=None, settable=False),
)
SAMPLING_KEYS = tuple(k for k, s in SETTINGS.items() if s.table == "sampling")
SETTABLE = tuple(k for k, s in SETTINGS.items() if s.settable)  # /set in chat, and what a saved chat keeps


def setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise UserError(f"unknown setting {name!r}; the settings are: {', '.join(SETTINGS)}")
    return SETTINGS[name]


def check(name: str, value: object, where: str | None = None) -> object:
    """`value` if it is valid for `name`, else a one-line UserError; `where` names the source (default: the flag).

    None is valid where the built-in default is decided at run time (seed, ctx, threads); gpu_layers takes "auto".
    """
    s = setting(name)
    where = where or f"{s.flag} {value}"
    if value is None and s.default is None or name == "gpu_layers" and value == "auto":
        return value
    if s.kind is str:  # a word from a fixed list (kv_cache, flash_attn)
        word = value.strip().lower() if isinstance(value, str) else None
        if word is None or not s.ok(word):
            raise UserError(f"{where}: {name} must be {s.rule}, e.g. {s.example}")
        return word
    whole = s.kind is int
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and isinstance(value, float)
                                                                         and not value.is_integer()):
        raise UserError(f"{where}: {name} must be {s.rule}")
    value = s.kind(value)
    if isinstance(value, float) and not math.isfinite(value) or not s.ok(value):
        raise UserError(f"{where}: {name} must be {s.rule}, e.g. {s.example}")
    return value


def parse(name: str, raw: str, usage: str | None = None) -> object:
    """A value as typed (/set, a --gpu-layers flag): checked here, so a typo is a one-line hint, never a broken run.

    `usage` is how the setting is written where it was typed ("/set top_p"; default: the flag)."""
    s = setting(name)
    usage = usage or s.flag
    word = raw.strip().lower()
    if word in s.none_words:
        return "auto" if name == "gpu_layers" else None
    if s.kind is str:
        try:
            return check(name, word)
        except UserError:
            raise UserError(f"{usage} {raw.strip()!r} is not valid: {name} must be {s.rule}, e.g. {usage} "
                            f"{s.example}") from None
    try:
        value = float(word) if s.kind is float else int(word, 10)
    except ValueError:
        raise UserError(f"{usage} {raw.strip()!r} is not valid: {name} must be {s.rule}, e.g. {usage} {s.example}"
                        ) from None
    return check(name, value, f"{usage} {raw.strip()}")


DRAFTS = ("off", "lookup")  # --draft's words; anything else names a draft model
# measured in docs/benchmarks.md: 1.14-1.38x where the answer quotes its input, 0.97-1.03x where little is kept
DEFAULT_DRAFT = "lookup"


def draft(raw: str, resolve: Callable[[str], Path], usage: str = "--draft") -> str | Path:
    """--draft (config.toml's draft, /set draft) as typed: "off", "lookup", or a draft model that `resolve` (the
    store's rule) turns into a file."""
    word = raw.strip()
    if word.lower() in DRAFTS:
        return word.lower()
    if not word:
        raise UserError(f"{usage} needs a value: off, lookup, or a draft model (a name from `malhae models` or a "
                        ".gguf file)")
    try:
        found = resolve(word)
        if not found.is_file():
            raise UserError(f"{found} is a directory, not a model file" if found.is_dir()
                            else f"model file {found} does not exist")
    except UserError as e:
        raise UserError(f"{usage} {word}: {e}; give off, lookup, or a draft model of the same tokenizer") from None
    return found


def gpu_layers(value: str | int | None) -> str | int:
    """--gpu-layers as given (auto, or a number typed as text) or from the settings file; None: the built-in."""
    if value is None:
        return SETTINGS["gpu_layers"].default  # type: ignore[return-value]
    return parse("gpu_layers", value) if isinstance(value, str) else check("gpu_layers", value)  # type: ignore


def context_size(requested: int | None, trained: int | None) -> int:
    """The context a run uses: as asked (checked), else the model's trained context, at most DEFAULT_MAX_CTX."""
    if requested is None:
        return min(int(trained or 2048), DEFAULT_MAX_CTX)
    return check("ctx", requested)  # type: ignore[return-value]


def _default(name: str):
    return field(default=SETTINGS[name].default)


@dataclass
class Sampling:
    """How tokens are chosen and when generation stops; defaults are the table's."""

    temperature: float = _default("temperature")  # 0: greedy
    top_k: int = _default("top_k")
    top_p: float = _default("top_p")
    min_p: float = _default("min_p")
    repeat_penalty: float = _default("repeat_penalty")
    frequency_penalty: float = _default("frequency_penalty")
    presence_penalty: float = _default("presence_penalty")
    repeat_last_n: int = _default("repeat_last_n")
    seed: int | None = _default("seed")  # None: a different seed each time
    max_tokens: int = _default("max_tokens")
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: random-weight models emit end tokens at random
    # the text is an answer to a chat prompt ("…어시스턴트:"), not a continuation: the whitespace the prompt format
    # leaves before it is not part of it (app.runtime.stream.TextStream drops it; the model's input is unchanged)
    answer: bool = False
    # constrained decoding (app.runtime.grammar): the answer follows this JSON schema's or GBNF's grammar, and ends
    # where the grammar does
    grammar: Grammar | None = None

    def checked(self) -> Sampling:
        """Self, after every table value has been checked (a library caller may build one by hand)."""
        for name in SAMPLING_KEYS:
            check(name, getattr(self, name))
        if any(not isinstance(s, str) or not s for s in self.stop):  # "" is found everywhere: every answer empty
            raise UserError("--stop '': a stop text cannot be empty; give the text to stop before, e.g. --stop 질문:")
        return self


@dataclass(frozen=True)
class Lora:
    """One LoRA adapter applied at run time (app.runtime.lora): its GGUF file and its scale (1: as trained)."""

    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".gguf")

    def __str__(self) -> str:
        return self.name if self.scale == 1 else f"{self.name}:{self.scale:g}"


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded, as one value: the CLI builds it once (flag > config.toml > this table's default, in
    app.cli.options.load_options) and it goes whole to the engine, the server, the chat's /model, eval and info.

    Why one value: each new load-time setting used to be spelled out in about 13 files and 20 signatures, renamed on
    the way (--ctx, "ctx", n_ctx; --parallel, n_seq). A new setting is now a row in SETTINGS (if config.toml may set
    it), a field here, its option declaration in app/cli/options.py, and the line of app/runtime/llama.py (Context or
    Model) that hands it to llama.cpp.

    Each field keeps its flag's name; llama.cpp's own words differ in one place, app.runtime.llama.Context: ctx →
    n_ctx (per sequence: the KV cache holds ctx × parallel tokens), batch → n_batch, threads → n_threads,
    parallel → n_seq_max, kv_cache_k/v → type_k/type_v, flash_attn → flash_attn_type; gpu_layers and device
    become app.runtime.offload's plan (n_gpu_layers, devices, tensor_split). None means "decided when the model is
    read": the engine resolves ctx, batch and threads and keeps the result as `Engine.options`."""

    model: Path | None = None  # the GGUF file (None until the store has resolved --model)
    ctx: int | None = field(default=SETTINGS["ctx"].default)  # None: the model's trained context, ≤ DEFAULT_MAX_CTX
    batch: int = DEFAULT_BATCH  # tokens per llama_decode, at most ctx
    threads: int | None = field(default=SETTINGS["threads"].default)  # None: the physical cores
    gpu_layers: str | int = field(default=SETTINGS["gpu_layers"].default)  # "auto", 0 (CPU only) or a number
    device: str | None = None  # --device: None (auto), cpu, names or numbers (app.runtime.devices.select)
    parallel: int = 1  # sequences with their own part of one KV cache (the server's slots)
    draft: str | Path | None = None  # speculative decoding: None/"off", "lookup" or a draft model's file
    draft_max: int = field(default=SETTINGS["draft_max"].default)
    kv_cache_k: str = field(default=SETTINGS["kv_cache"].default)  # the KV cache's types (app.runtime.kv)
    kv_cache_v: str = field(default=SETTINGS["kv_cache"].default)
    flash_attn: str = field(default=SETTINGS["flash_attn"].default)  # auto, on or off
    # where long prompts' states are kept (app.runtime.prompt_cache); None: no prompt cache
    prompt_cache: Path | None = None
    prompt_cache_max: float = field(default=SETTINGS["prompt_cache_max"].default)  # GiB
    lora: tuple[Lora, ...] = ()  # adapters applied on top of the model, in order (app.runtime.lora)
    verbose: bool = False  # llama.cpp's own log on stderr

    @property
    def kv_tokens(self) -> int:
        """Tokens of K/V the context holds: ctx for each of the parallel sequences (ctx must be resolved)."""
        if self.ctx is None:
            raise ValueError("LoadOptions.ctx is not resolved yet (Engine.options has it)")
        return self.ctx * self.parallel

    @property
    def speculates(self) -> bool:
        return self.draft is not None and self.draft != "off"


def kv_fields(values: dict[str, object]) -> dict[str, object]:
    """Load settings by name with `kv_cache` (one type for K and V, as the flag and config.toml write it) turned into
    LoadOptions' kv_cache_k and kv_cache_v, unless K's or V's own is given: the one rule for flags, config.toml and a
    model's own settings."""
    out = dict(values)
    if "kv_cache" in out:
        both = out.pop("kv_cache")
        out["kv_cache_k"] = out.get("kv_cache_k") or both
        out["kv_cache_v"] = out.get("kv_cache_v") or both
    return out
