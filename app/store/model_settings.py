"""A store model's own settings: Ollama's Modelfile idea kept as data, in NAME.toml beside NAME.gguf in the store.

Why a file beside the model and not a section of config.toml: the settings belong to the model (its context, its
sampling, its system text, its adapters), so they are listed, shown and removed with it (`malhae models`, `models
set`, `models rm`), and config.toml stays the user's defaults for every model. Why not inside the GGUF: the file is
the converter's output and may be gigabytes; rewriting it to change a temperature would be absurd.

Every value is checked by the one settings table (app.runtime.settings) and the modules that own the other rules
(templates, lora, units.duration): this module says which keys a model may carry, never what a valid value is.
A broken file is one line naming the file, the key and the fix, like config.toml. `malhae models set` rewrites the
whole file (comments written by hand there are not kept); it is written atomically (app.files.write_text).

The bundled demo is no file in the store, but it is listed and run by name, so it may have settings too: they live in
the store under the name it is listed by (app.store.models.builtin_entries: demo.toml, or malhae-demo-ko-f16.toml
when a store model is called demo), and its adapter's under demo-signoff.toml.

An entry that is a LoRA adapter is an "adapter preset": serving it runs its base model with it, so it may carry
sampling keys, system, template, keep_alive and its `scale`, but not load settings or adapters: those are its base
model's.

Precedence, where the settings are used: a request's own value > the model's settings > the command's flags >
config.toml > the built-ins (app.runtime.settings).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from malhae import files, units
from malhae.errors import UserError
from malhae.runtime import lora as adapters
from malhae.runtime import settings as table
from malhae.runtime.gguf_info import read_info
from malhae.runtime.settings import SAMPLING_KEYS, Lora
from malhae.store import config, models
from malhae.store.config import RUN_KEYS
from malhae.store.local import Entry, Store, open_store

SUFFIX = ".toml"
MAX_FILE = 64 << 10  # a few lines and a system text
MAX_SYSTEM = 16 << 10  # bytes of UTF-8: a system text is read before every conversation
MAX_ITEM = 1024  # characters of one lora entry (a name or a path, and a scale)
MAX_DEVICE = 200
UNSET = "unset"  # ModelSettings.keep_alive when the file does not set it (None means "for ever")
TEXT_KEYS = ("system", "template", "lora", "keep_alive", "scale")
KEYS = (*RUN_KEYS, *SAMPLING_KEYS, *TEXT_KEYS)
ADAPTER_KEYS = (*SAMPLING_KEYS, "system", "template", "keep_alive", "scale")  # an adapter preset's
RULES = {"device": config.TOP_KEYS["device"],
         "system": "a text of at most 16 KiB (the system prompt of every conversation)",
         "template": "a prompt format's name, as --template takes it",
         "lora": f'at most {adapters.MAX_ADAPTERS} adapters, each NAME_OR_FILE[:SCALE]: lora=koalpaca-qlora,style:0.5'
                 ' (in the file: lora = ["koalpaca-qlora", "style:0.5"])',
         "keep_alive": 'a duration such as "5m", "1h" or "30s", or seconds (0: unload at once, -1: keep loaded)',
         "scale": f"a number from -{adapters.MAX_SCALE:g} to {adapters.MAX_SCALE:g} (1 = as trained)"}


@dataclass(frozen=True)
class ModelSettings:
    """A model's settings, each checked; a key absent from `values` is not set (the flags, config.toml or the
    built-in decide). Present with the value None: ctx "default" (the model's own) or seed "random", chosen on
    purpose over config.toml's; keep_alive None: for ever (see `has_keep_alive`)."""

    values: dict[str, object] = field(default_factory=dict)
    path: Path | None = None  # the file (None: none exists)

    def load_values(self) -> dict[str, object]:
        """The load settings it sets (app.store.config.RUN_KEYS): ctx, threads, gpu_layers, device, kv_cache…"""
        return {k: v for k, v in self.values.items() if k in RUN_KEYS}

    def sampling(self) -> dict[str, object]:
        """The sampling settings it sets (app.runtime.settings.SAMPLING_KEYS)."""
        return {k: v for k, v in self.values.items() if k in SAMPLING_KEYS}

    @property
    def system(self) -> str | None:
        return self.values.get("system")  # type: ignore[return-value]

    @property
    def template(self) -> str | None:
        """A name for app.runtime.templates.get."""
        return self.values.get("template")  # type: ignore[return-value]

    @property
    def lora(self) -> list[str]:
        """Adapters as written (NAME_OR_FILE[:SCALE]); `loras()` turns them into files."""
        return list(self.values.get("lora", ()))  # type: ignore[call-overload]

    @property
    def has_keep_alive(self) -> bool:
        return "keep_alive" in self.values

    @property
    def keep_alive(self) -> float | None | str:
        """Seconds idle before the model is unloaded; None: for ever; UNSET ("unset") when the file says nothing."""
        return self.values["keep_alive"] if self.has_keep_alive else UNSET  # type: ignore[return-value]

    @property
    def scale(self) -> float | None:
        """An adapter preset's scale (None: not set, i.e. 1)."""
        return self.values.get("scale")  # type: ignore[return-value]

    def loras(self) -> tuple[Lora, ...]:
        """The adapters, resolved the way --lora is (a store name or a file) and checked to exist."""
        return tuple(adapters.parse(v, models.resolve, f"{self.path}: lora") for v in self.lora)

    def as_dict(self) -> dict[str, object]:
        """JSON's form: ctx "default", seed "random" and keep_alive as text ("5m", "forever") rather than null."""
        out: dict[str, object] = {}
        for key, value in self.values.items():
            if key == "keep_alive":
                value = units.duration_text(value)  # type: ignore[arg-type]
            elif value is None:
                value = table.SETTINGS[key].none_words[0]
            out[key] = value
        return out


# --- finding a model's file ----------------------------------------------------------------------------------------

def find(store: Store, name: str) -> Entry:
    """The model (or adapter) NAME: the store's, else the bundled demo's under the name it is listed by."""
    entry = store.get(name)
    if entry is not None:
        return entry
    path = models.builtin(name)
    if path is not None:
        found = [e for e in models.builtin_entries(store.names()) if e.path == path]
        if found:
            return found[0]
    raise store.not_found(name)


def sidecar(store: Store, entry: Entry) -> Path:
    return store.root / f"{entry.name}{SUFFIX}"


def read(store: Store, name: str) -> ModelSettings:
    """NAME's settings (an unknown name is an error; no file: ModelSettings({}))."""
    entry = find(store, name)
    return _read(sidecar(store, entry), entry)


def for_path(path: Path) -> ModelSettings:
    """The settings of the model file a command runs: a store model's .gguf, or the bundled demo (or its adapter);
    any other file has none."""
    store = open_store()
    path = Path(path).expanduser()
    entry = None
    if path.suffix.lower() == ".gguf" and _same(path.parent, store.root):
        entry = store.get(path.stem) if (store.root / f"{path.stem}{SUFFIX}").exists() else None
    elif any(p is not None and _same(p, path) for p in (models.demo_model(), models.demo_model(models.DEMO_LORA))):
        entry = next((e for e in models.builtin_entries(store.names()) if _same(e.path, path)), None)
    return _read(sidecar(store, entry), entry) if entry is not None else ModelSettings({})


def listed(store: Store, entries: list[Entry]) -> dict[str, ModelSettings | UserError]:
    """Each entry's settings for `malhae models`, by name; a broken file is its error (listed, not fatal: the
    listing is where the user looks for what to fix)."""
    out: dict[str, ModelSettings | UserError] = {}
    for entry in entries:
        try:
            out[entry.name] = _read(sidecar(store, entry), entry)
        except UserError as e:
            out[entry.name] = e
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a.absolute() == b.absolute() or a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13): not the same file
        return False


def _fix(entry: Entry) -> str:
    return f"fix it, or remove it with `malhae models set {entry.name} --reset`"


def _raw(path: Path, entry: Entry) -> dict | None:
    """The file's TOML as written (None: there is none)."""
    try:
        text = files.read_user_text(path, "model settings file", limit=MAX_FILE, fix=_fix(entry))
    except files.MissingFile:
        return None
    return files.parse_toml(text.removeprefix("\ufeff"), f"model settings file {path}", _fix(entry))


def _read(path: Path, entry: Entry) -> ModelSettings:
    data = _raw(path, entry)
    if data is None:
        return ModelSettings({})
    return ModelSettings(_checked(data, path, entry), path)


# --- checking ------------------------------------------------------------------------------------------------------

def _checked(data: dict, path: Path, entry: Entry) -> dict[str, object]:
    """Every key and value of a file, in KEYS' order; the first wrong one is a one-line error naming the file."""
    values = {}
    for key, value in data.items():
        remove = f"remove it with `malhae models set {entry.name} {key}=`"
        _allowed(key, entry, f"{path}: ", remove)
        fix = f"fix the value, or {remove}"
        try:
            values[key] = _value(key, value, f"{key} = ")
        except UserError as e:
            raise UserError(f"{path}: {e}; {fix}") from None
    return {k: values[k] for k in KEYS if k in values}


def _allowed(key: str, entry: Entry, where: str, fix: str) -> None:
    keys = ADAPTER_KEYS if entry.adapter else tuple(k for k in KEYS if k != "scale")
    if key in keys:
        return
    if entry.adapter and key in KEYS:
        raise UserError(f"{where}{entry.name} is a LoRA adapter, so its preset cannot set {key}: that belongs to "
                        f"its base model; set it there (`malhae models set BASE {key}=…`)" +
                        (f"; {fix}" if where else ""))
    if key == "scale":
        raise UserError(f"{where}scale is an adapter preset's setting; give a model's adapters their scale in lora "
                        f"(lora=ADAPTER:0.5)" + (f"; {fix}" if where else ""))
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    guess = f" (did you mean {match[0]!r}?)" if match else ""
    how = "flat, not under [sampling]: temperature = 0.3" if key == "sampling" else ", ".join(keys)
    raise UserError(f"{where}unknown setting {key!r}{guess}; the keys are {how}" +
                    (f"; {fix}" if where else ""))


def _value(key: str, value: object, form: str) -> object:
    """A value as TOML holds it, checked; `form` is how the key is written where the user wrote it ("ctx = " in
    the file, "ctx=" on the command line), for the example in the message."""
    if key in table.SETTINGS:
        s = table.SETTINGS[key]
        try:
            if isinstance(value, str):
                return table.parse(key, value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return table.check(key, value, "")
        except UserError:
            pass
        shown = f", not {_shown(value)}" if form.endswith(" = ") else ""  # typed: the message starts with it
        raise UserError(f"{key} must be {s.rule}{shown}, e.g. {form}{s.example}")
    if key == "keep_alive":
        return units.duration(value, key)
    if key == "scale":
        return adapters.parse_scale(value, key)
    if key == "lora":
        return _lora_list(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key} must be {RULES[key]}, not {_shown(value)}")
    if key == "device":
        if len(value) > MAX_DEVICE:
            raise UserError(f"{key} must be {RULES[key]}, not a text of {len(value)} characters")
        return value.strip()
    if key == "system":
        if "\x00" in value or len(value.encode("utf-8")) > MAX_SYSTEM:
            raise UserError(f"system must be {RULES[key]} and without NUL characters, not "
                            f"{units.size(len(value.encode('utf-8')))}")
        return value
    from malhae.runtime import templates

    return templates.get(value.strip()).name


def _lora_list(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"lora must be {RULES['lora']}, not {_shown(value)}")
    if len(value) > adapters.MAX_ADAPTERS:
        raise UserError(f"lora names {len(value)} adapters; malhae applies at most {adapters.MAX_ADAPTERS}")
    out = []
    for item in value:
        if len(item) > MAX_ITEM:
            raise UserError(f"lora: an entry of {len(item)} characters; give a store name or a path")
        adapters.split_scale(item.strip(), "lora")  # the scale's rule; the file is found when it is used
        out.append(item.strip())
    return out


def _shown(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:39] + "…"


# --- changing ------------------------------------------------------------------------------------------------------

def pairs(typed: list[str], name: str) -> dict[str, str | None]:
    """`KEY=VALUE` words as typed (`KEY=`: None, remove it); a word without `=` or a key given twice is an error."""
    out: dict[str, str | None] = {}
    for word in typed:
        key, sep, value = word.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise UserError(f"{word!r} is not KEY=VALUE: write e.g. `malhae models set {name} temperature=0.3` "
                            "(KEY= removes a setting)")
        if key in out:
            raise UserError(f"{key} is given twice; give it once")
        out[key] = value if value.strip() else None
    return out


def keys_in(store: Store, name: str) -> set[str]:
    """The keys NAME's file holds, right or wrong (a value it must not hold can still be removed: `ctx=`)."""
    entry = find(store, name)
    return set(_raw(sidecar(store, entry), entry) or ())


def update(store: Store, name: str, changes: dict[str, str | None]) -> ModelSettings:
    """Set (a value as typed) or remove (None) each key; the whole result is checked before the file is written,
    so a mistake leaves it as it was. A file that holds nothing any more is removed."""
    entry = find(store, name)
    path = sidecar(store, entry)
    data = _raw(path, entry) or {}
    for key, typed in changes.items():
        if typed is None and key in data:  # a key the file holds, even one it should not: removed
            del data[key]
            continue
        _allowed(key, entry, "", "")
        if typed is None:
            continue
        value = _typed(key, typed, entry)
        data[key] = table.SETTINGS[key].none_words[0] if value is None and key in table.SETTINGS else \
            typed.strip() if key == "keep_alive" else value
    values = _checked(data, path, entry)
    data = {k: data[k] for k in KEYS if k in data}
    if not data:
        _remove(path)
        return ModelSettings({})
    store.ensure_root()
    header = (f"# {entry.name}'s own settings, read when it is run by name; written by `malhae models set "
              f"{entry.name} KEY=VALUE` (comments are not kept)\n")
    try:
        files.write_text(path, header + config.dumps(data))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; check the store folder's permissions") from None
    return ModelSettings(values, path)


def _typed(key: str, typed: str, entry: Entry) -> object:
    """A value typed on the command line, checked as the file's would be; adapters are found and checked against
    the model now (a typo is said when it is set, not when the model is served)."""
    text = typed if key == "system" else typed.strip()
    if key == "scale":
        return adapters.parse_scale(text, f"scale={_cut(text)}")
    if key == "keep_alive":  # its message quotes the value
        return units.duration(text, key)
    if key == "lora":  # each entry's message names it: "lora NAME: …"
        items = [item.strip() for item in text.split(",")]
        try:
            value = _lora_list([item for item in items if item])
        except UserError as e:
            raise UserError(f"lora={_cut(text)}: {e}") from None
        found = tuple(adapters.parse(item, models.resolve, "lora") for item in value)
        try:
            adapters.check(found, read_info(entry.path))
        except UserError as e:
            raise UserError(f"lora={_cut(text)}: {e}") from None
        return value
    try:
        return _value(key, text, f"{key}=")
    except UserError as e:
        raise UserError(f"{key}={_cut(text)}: {e}") from None


def _cut(text: str) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= 40 else text[:39] + "…"


def reset(store: Store, name: str) -> bool:
    """Remove NAME's settings file; False when it has none. A file left by a model removed by hand goes too."""
    try:
        path = sidecar(store, find(store, name))
    except UserError:
        path = store.path_for(name).with_suffix(SUFFIX)
        if not path.is_file():
            raise
    return _remove(path)


def _remove(path: Path) -> bool:
    if not path.exists() and not path.is_symlink():
        return False
    try:
        path.unlink()
    except OSError as e:
        raise UserError(f"cannot remove {path}: {e.strerror or e}") from None
    return True


def over(settings, own: ModelSettings):
    """The settings file's values with a model's own on top (app.store.config.Settings): what `malhae chat`, `ask`
    and `complete` start from when they run that model, so that its flags still win and config.toml fills in what the
    model leaves out."""
    from dataclasses import replace

    values = own.load_values()
    return replace(settings, **values, sampling=settings.sampling | own.sampling(),
                   lora=own.lora if "lora" in own.values else settings.lora)
