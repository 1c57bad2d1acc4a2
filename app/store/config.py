"""The settings file (config.toml): the user's own defaults, between the command-line flags and malhae's built-ins.

Precedence is always flag > settings file > built-in default, so every option that the file can set has None as its
command-line default; what each setting may be and its built-in default are app.runtime.settings' table, which the
help text, the commands and this parser all read. The file is optional (missing = built-ins); a broken one is a
one-line error naming the file, the key and the fix, never a silently ignored setting. malhae writes it only for
`malhae models default`, with a small writer for the few value kinds it supports (no TOML-writing dependency),
changing just the one line and keeping the user's comments, and atomically (app.files.write_text) so that an
interrupted write never leaves half a file.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from malhae import files
from malhae.errors import UserError
from malhae.runtime import settings as table
from malhae.runtime.settings import ONESHOT_MAX_TOKENS, SAMPLING_KEYS, SETTINGS, check

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = {"default_model": "a string (a store name or a path to a .gguf file)", "sampling": "a table: [sampling]",
            "endpoint": "a string: an OpenAI-compatible API's base URL, e.g. http://127.0.0.1:8080/v1",
            "api_key_env": "a string: the name of the environment variable that holds the endpoint's API key",
            "endpoint_timeout": "a number of seconds from 0.1 to 86400",
            "draft": "a string: off, lookup, or a draft model (a store name or a path to a .gguf file)",
            "device": "a string: auto, cpu, or GPUs as `malhae info` lists them (CUDA1, MTL0, Vulkan0, 1, CUDA0,CUDA1)",
            "prompt_cache": "true or false (keep long prompts' evaluated state on disk)",
            "keep_alive": 'a duration: how long `malhae serve` keeps an idle model loaded, e.g. "5m", "1h", 0, -1 '
                          "(for ever)",
            "lora": 'a list of LoRA adapters, each a store name or a .gguf file with an optional :SCALE, e.g. '
                    '["koalpaca-qlora", "style.gguf:0.5"]'}
STRING_KEYS = ("default_model", "endpoint", "api_key_env", "draft", "device")
TOP_KEYS |= {k: s.rule for k, s in SETTINGS.items() if s.table is None}


@dataclass
class Settings:
    """What the settings file says; None (or absent from `sampling`) means the file leaves it to the built-in."""

    path: Path
    exists: bool = False
    default_model: str | None = None
    gpu_layers: str | int | None = None
    ctx: int | None = None
    threads: int | None = None
    sampling: dict[str, float | int] = field(default_factory=dict)
    endpoint: str | None = None
    api_key_env: str | None = None  # the key itself never sits in the file
    endpoint_timeout: float | None = None
    draft: str | None = None  # speculative decoding: off, lookup or a model (resolved when a command runs)
    draft_max: int | None = None
    device: str | None = None  # --device's default (checked against this machine's devices when a model loads)
    kv_cache: str | None = None  # the KV cache's types (app.runtime.kv); _k and _v override kv_cache for one
    kv_cache_k: str | None = None
    kv_cache_v: str | None = None
    flash_attn: str | None = None
    prompt_cache: bool | None = None  # the prompt cache on disk (on unless false)
    prompt_cache_max: float | None = None  # GiB
    lora: list[str] | None = None  # adapters applied by default (resolved when a command runs: app.runtime.lora)
    keep_alive: str | int | float | None = None  # `malhae serve`'s default, as written (checked: units.duration)


MAX_FILE = 1 << 20  # a settings file is a few lines


def config_path() -> Path:
    """$MALHAE_CONFIG (a file), else config.toml in malhae's config folder (app.files.config_dir)."""
    explicit = os.environ.get("MALHAE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return files.config_dir() / "config.toml"


def load(path: Path | None = None) -> Settings:
    path = path or config_path()
    try:
        text = _read(path)
    except files.MissingFile:  # no settings file: the built-in defaults
        return Settings(path)
    return parse(text, path)


def _read(path: Path) -> str:
    """The settings file's text (files.read_user_text's messages); Windows editors start files with a BOM."""
    return files.read_user_text(path, "settings file", limit=MAX_FILE,
                                fix="fix it, or set MALHAE_CONFIG to use another file").removeprefix("\ufeff")


def parse(text: str, path: Path) -> Settings:
    """Check every key, type and range (app.runtime.settings' table): a typo must not silently fall back to a
    built-in default, and a value out of range is reported with its line, not later by whichever command reads it."""
    data = files.parse_toml(text, f"settings file {path}", "fix that line or delete the file")
    settings = Settings(path, exists=True)
    for key, value in data.items():
        if key in ("api_key", "key", "token"):
            raise UserError(f"{_where(path, text, key)}: a settings file must not hold an API key (it is read by "
                            "anyone who can read the file, and copied with it); keep the key in an environment "
                            "variable and name it: api_key_env = \"MALHAE_API_KEY\"")
        if key not in TOP_KEYS:
            raise UserError(f"{_where(path, text, key)}: unknown key {key!r}{_guess(key, TOP_KEYS)}; the keys are "
                            f"{', '.join(k for k in TOP_KEYS if k != 'sampling')} and [sampling] "
                            f"{', '.join(SAMPLING_KEYS)}; remove or rename it")
        if key == "sampling":
            if not isinstance(value, dict):
                raise UserError(f"{_where(path, text, key)}: sampling must be a table ([sampling] on its own line, "
                                "then key = value lines)")
            settings.sampling = _parse_sampling(value, path, text)
        elif key in STRING_KEYS:
            if not isinstance(value, str) or not value.strip():
                raise _type_error(path, text, key, TOP_KEYS[key], value)
            setattr(settings, key, value.strip())
        elif key == "lora":
            if not isinstance(value, list) or len(value) > 16 or not all(isinstance(v, str) and v.strip()
                                                                         for v in value):
                raise _type_error(path, text, key, TOP_KEYS[key], value)
            settings.lora = [v.strip() for v in value]
        elif key == "keep_alive":
            from malhae import units

            try:
                units.duration(value, key)
            except UserError:
                raise _type_error(path, text, key, TOP_KEYS[key], value) from None
            settings.keep_alive = value
        elif key == "prompt_cache":
            if not isinstance(value, bool):
                raise _type_error(path, text, key, TOP_KEYS[key], value)
            settings.prompt_cache = value
        elif key == "endpoint_timeout":
            from malhae.runtime.endpoint import check_timeout

            try:
                settings.endpoint_timeout = check_timeout(value, "")
            except UserError:
                raise _type_error(path, text, key, TOP_KEYS[key], value) from None
        else:
            setattr(settings, key, _value(path, text, key, value))
    return settings


def _parse_sampling(table: dict, path: Path, text: str) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, value in table.items():
        if key not in SAMPLING_KEYS:
            raise UserError(f"{_where(path, text, key, 'sampling')}: unknown key {key!r} in [sampling]"
                            f"{_guess(key, SAMPLING_KEYS)}; the keys "
                            f"are {', '.join(SAMPLING_KEYS)}; remove or rename it")
        out[key] = _value(path, text, key, value, "sampling")
    return out


def _value(path: Path, text: str, key: str, value: object, table: str | None = None):
    """The value, checked against the settings table; None is never written in TOML, so it is always refused."""
    try:
        if value is None:
            raise UserError("")
        return check(key, value, "")
    except UserError:
        raise _type_error(path, text, key, SETTINGS[key].rule, value, table) from None


def _guess(key: str, known) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    if match:
        return f" (did you mean {match[0]!r}?)"
    if known is TOP_KEYS:  # a sampling setting written above the [sampling] header
        match = difflib.get_close_matches(key, list(SAMPLING_KEYS), n=1, cutoff=0.7)
        return f" (did you mean [sampling] {match[0]}?)" if match else ""
    return ""


def _type_error(path: Path, text: str, key: str, kind: str, value: object, table: str | None = None) -> UserError:
    shown = f"{table}.{key}" if table else key
    return UserError(f"{_where(path, text, key, table)}: {shown} must be {kind}, not {_shown(value)}; fix the value "
                     "or remove the line")


def _shown(value: object) -> str:
    try:
        return _toml(value)
    except TypeError:
        return {list: "an array", dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def _where(path: Path, text: str, key: str, table: str | None = None) -> str:
    """`file, line N` for the key's line when it can be found (tomllib reports lines only for syntax errors)."""
    current = None
    pattern = re.compile(rf"""\s*(["']?){re.escape(key)}\1\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\s*([^\]]*?)\s*\]", line)
        if header:
            current = header.group(1).strip("\"'")
            if table is None and current == key:
                return f"{path}, line {number}"
            continue
        if current == table and pattern.match(line):
            return f"{path}, line {number}"
    return str(path)


# --- precedence --------------------------------------------------------------------------------------------------

def pick(flag, file_value, default):
    """flag > settings file > built-in default (None means "not given")."""
    if flag is not None:
        return flag
    return file_value if file_value is not None else default


def sampling_values(command: str, flags: dict[str, object], settings: Settings) -> dict[str, object]:
    """Sampling settings for `command` (complete, ask, chat): each from the flag, the file or the built-in.

    Flags are checked here (the file's values were checked when it was read), so every entry point refuses the same
    values with the same words.
    """
    out: dict[str, object] = {}
    for key in SAMPLING_KEYS:
        default = SETTINGS[key].default
        if key == "max_tokens" and command in ("complete", "ask"):
            default = ONESHOT_MAX_TOKENS
        flag = flags.get(key)
        if flag is not None:
            check(key, flag)
        out[key] = pick(flag, settings.sampling.get(key), default)
    return out


# the load settings config.toml may set (app.runtime.settings.LoadOptions' fields), but the draft (resolved through
# the store, app.cli.options) and the sampling table
RUN_KEYS = ("ctx", "threads", "gpu_layers", "device", "kv_cache", "kv_cache_k", "kv_cache_v", "flash_attn")


def runtime_values(flags: dict[str, object], settings: Settings) -> dict[str, object]:
    """RUN_KEYS: flag > file > built-in (None for ctx and threads: the model's / the CPU's; None for device:
    auto)."""
    out: dict[str, object] = {}
    for key in RUN_KEYS:
        flag = flags.get(key)
        if key == "device":  # a name, checked against this machine's devices when a model loads
            out[key] = pick(flag, settings.device, None)
            continue
        if key == "gpu_layers" and isinstance(flag, str) or flag is not None and SETTINGS[key].kind is str:
            flag = table.parse(key, flag)
        elif flag is not None:
            check(key, flag)
        out[key] = pick(flag, getattr(settings, key), SETTINGS[key].default)
    return out


# --- writing -----------------------------------------------------------------------------------------------------

def set_default_model(value: str | None, path: Path | None = None) -> Path:
    """Write (or with None, remove) `default_model`, keeping everything else in the file as it was."""
    path = path or config_path()
    try:
        text = _read(path)
    except files.MissingFile:  # the first setting: the file is created
        text = ""
    if text:
        parse(text, path)  # refuse to build on a broken file: the user should see and fix it first
    new = set_top_level(text, "default_model", value)
    check = parse(new, path)
    if check.default_model != (value.strip() if value else None):  # pragma: no cover - the line edit went wrong
        data = tomllib.loads(text) if text else {}
        data.pop("default_model", None)
        new = dumps(({"default_model": value} if value else {}) | data)
    try:
        files.write_text(path, new)
    except OSError as e:
        raise UserError(f"cannot write settings file {path}: {e.strerror or e}; check the directory's permissions "
                        "or set MALHAE_CONFIG to another file") from None
    return path


def set_top_level(text: str, key: str, value: str | int | float | bool | None) -> str:
    """Replace, add or (value None) remove the top-level `key = …` line; other lines and comments stay."""
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if re.match(r"\s*\[", line)), len(lines))  # first table header
    pattern = re.compile(rf"""\s*(["']?){re.escape(key)}\1\s*=""")
    index = next((i for i in range(end) if pattern.match(lines[i])), None)
    new_line = f"{key} = {_toml(value)}\n" if value is not None else None
    if index is not None:
        if new_line is None:
            del lines[index]
        else:
            lines[index] = new_line
    elif new_line is not None:
        at = end
        while at > 0 and not lines[at - 1].strip():  # before the blank lines that separate the first table
            at -= 1
        if at > 0 and not lines[at - 1].endswith("\n"):
            lines[at - 1] += "\n"
        lines.insert(at, new_line)
    return "".join(lines)


def dumps(data: dict) -> str:
    """TOML for the value kinds settings use: strings, numbers, booleans, lists of strings and one level of tables
    (config.toml and the store's per-model files, app.store.model_settings)."""
    top = [f"{k} = {_toml(v)}\n" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "".join(f"{kk} = {_toml(vv)}\n" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "".join(top) + "".join(tables)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
        return f'"{escaped}"'
    if isinstance(value, list) and all(isinstance(v, str) for v in value):  # lora = ["a", "b:0.5"]
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"settings cannot hold a {type(value).__name__}")
