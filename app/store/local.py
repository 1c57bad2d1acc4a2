"""The model store: a flat directory of NAME.gguf files, so that `--model polyglot-ko-1.3b-q4_k_m` needs no path.

There is no index: everything `malhae models` shows (type, size, parameters, source) is read from each file's own GGUF
metadata, so nothing can get out of step with the files, and a file copied in by hand is a model like any other.
Files are put in place the way the converter does it: written to a hidden temporary file in the store directory and
renamed only when complete, so an interrupted copy never leaves a model that looks whole. Hidden and partial files
are ignored.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from malhae import files, flags, units
from malhae.errors import UserError
from malhae.runtime.gguf_info import GGUFInfo, read_info

SUFFIX = ".gguf"
CHUNK = 8 << 20
_NAME = re.compile(r"[^\W_][\w.+-]{0,127}")  # letters (Hangul too), digits, . _ + -; no separators, no leading dot
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    type: str  # "q4_k_m", "f16", … from general.file_type; "?" when the file does not say
    size: int  # bytes on disk
    source: str | None  # where it was converted from (malhae.source, or general.source.*)
    params: int | None  # from the tensor table
    architecture: str | None = None
    error: str | None = None  # set when the file cannot be read as a GGUF: listed, so the user can remove it
    builtin: bool = False  # the bundled demo (app.store.models), listed beside the store's files, never in it
    kind: str = "model"  # or "adapter": a LoRA adapter (general.type = adapter), applied with --lora, never run alone
    base: str | None = None  # an adapter's base model as its adapter_config.json named it (app.store.adapters)

    @property
    def adapter(self) -> bool:
        return self.kind == "adapter"

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "type": self.type, "size": self.size,
                "params": self.params, "source": self.source, "architecture": self.architecture,
                "error": self.error, "builtin": self.builtin, "kind": self.kind} | \
            ({"base": self.base} if self.adapter else {})


def models_dir() -> Path:
    """--models-dir, else models/ in malhae's data folder (app.files.data_dir), next to chat_history."""
    root = Path(flags.MODELS_DIR).expanduser() if flags.MODELS_DIR is not None else files.data_dir() / "models"
    kind = files.not_regular(root) if root.exists() else None
    if root.exists() and kind != "a directory":  # a file given as the store would read as an empty store
        what = "a file" if kind is None else kind
        flag = "--models-dir" if flags.MODELS_DIR is not None else "the model store"
        raise UserError(f"{flag} {root} is {what}, not a folder; give a folder (it is created when needed)")
    return root


def entry_for(name: str, path: Path, info: GGUFInfo) -> Entry:
    if info.text(Keys.General.TYPE) == "adapter":  # its tensors' type (f16, f32): it has no general.file_type
        base = info.text(Keys.General.BASE_MODEL_NAME.format(id=0))
        return Entry(name=name, path=path, type=info.tensors[0].type.name.lower() if info.tensors else "?",
                     size=info.file_size, source=info.source, params=info.n_params or None,
                     architecture=info.architecture, kind="adapter", base=base)
    return Entry(name=name, path=path, type=info.file_type or "?", size=info.file_size, source=info.source,
                 params=info.n_params or None, architecture=info.architecture)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"Store({self.root})"

    # --- reading -----------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.root.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file())

    def entries(self) -> list[Entry]:
        return [entry for entry in (self.get(name) for name in self.names()) if entry is not None]

    def get(self, name: str) -> Entry | None:
        try:
            path = self.path_for(name)
        except UserError:
            return None
        if not path.is_file():
            return None
        try:
            return entry_for(name, path, read_info(path))
        except UserError as e:
            size = path.stat().st_size if path.exists() else 0
            return Entry(name, path, "?", size, None, None, error=str(e))

    def suggest(self, name: str) -> str | None:
        """The nearest name in the store, for "did you mean …?"."""
        names = self.names()
        lowered = {n.lower(): n for n in names}
        match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
        return lowered[match[0]] if match else None

    def path_for(self, name: str) -> Path:
        """Where NAME.gguf goes; a name is one file name in the store, never a path."""
        name = name.strip()
        if name.lower().endswith(SUFFIX):
            name = name[:-len(SUFFIX)]
        if not _NAME.fullmatch(name):
            raise UserError(f"{name!r} cannot be a model name: use letters, digits, '.', '_', '+' and '-' (no "
                            "slashes or spaces, not starting with '.' or '-'), e.g. polyglot-ko-1.3b-q4_k_m")
        return self.root / f"{name}{SUFFIX}"

    def not_found(self, name: str, removing: bool = False) -> UserError:
        guess = self.suggest(name)
        if guess:
            return UserError(f"no model named '{name}' in {self.root}; see `malhae models` (did you mean '{guess}'?)")
        if removing:  # nothing to add or convert: the user wants one gone
            return UserError(f"no model named '{name}' in {self.root}, so nothing was removed; see `malhae models` "
                             "for the names")
        if not self.names():
            return UserError(f"no model named '{name}' in {self.root} (the store is empty); give a path to a .gguf "
                             "file, or add one with `malhae models import FILE.gguf` or `malhae convert … --add`")
        return UserError(f"no model named '{name}' in {self.root}; see `malhae models` for the names")

    # --- writing -----------------------------------------------------------------------------------------------

    def check_new(self, name: str, force: bool) -> Path:
        """The path for a new model NAME, refused early if it is taken (before minutes of converting or copying)."""
        dest = self.path_for(name)
        kind = files.not_regular(dest)
        if kind:
            raise UserError(f"{dest} is {kind}; remove it or choose another name with --name")
        if dest.exists() and not force:
            raise UserError(f"a model named '{dest.stem}' is already in the store ({dest}); add --force to replace "
                            "it, or choose another name with --name")
        return dest

    def ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the model store {self.root}: {e.strerror or e}; choose another place "
                            "with --models-dir or MALHAE_HOME") from None
        if not os.access(self.root, os.W_OK):
            raise UserError(f"cannot write to the model store {self.root}; choose another place with --models-dir "
                            "or MALHAE_HOME")

    def add(self, src: Path, name: str | None = None, *, move: bool = False, force: bool = False,
            progress: Progress | None = None) -> Entry:
        """Copy (or move) a GptNeoX GGUF into the store as NAME.gguf (default: the file's own name)."""
        src = Path(src).expanduser()
        if not src.exists():
            raise UserError(f"{src} does not exist; give the path of a .gguf file")
        if src.is_dir():
            raise UserError(f"{src} is a directory; import takes a .gguf file (convert a checkpoint folder with "
                            "`malhae convert DIR --add`)")
        info = read_info(src)  # not a GGUF, truncated: refused here, before anything is written
        if info.architecture != "gptneox":
            raise UserError(f"{src.name} is a {info.architecture or 'unknown'} model; malhae runs GPT-NeoX models "
                            "(the Polyglot-Ko family), so it is not added")
        dest = self.check_new(name or src.name, force)
        if dest.exists() and dest.resolve() == src.resolve():
            raise UserError(f"{src} is already in the store as '{dest.stem}'")
        self.ensure_root()
        files.sweep(self.root)  # partial copies of earlier runs that were killed outright
        if move and _same_device(src, self.root):
            os.replace(src, dest)  # a rename: instant, and atomic
        else:
            self._copy(src, dest, info.file_size, progress)
            if move:
                src.unlink()
        entry = self.get(dest.stem)
        assert entry is not None
        return entry

    def _copy(self, src: Path, dest: Path, size: int, progress: Progress | None) -> None:
        free = shutil.disk_usage(self.root).free
        if free < size + (16 << 20):
            raise UserError(f"not enough free disk space in {self.root}: {src.name} needs {units.size(size)} and "
                            f"{units.size(free)} are free; free some space or use --models-dir on another disk")
        try:
            with files.partial(dest) as tmp:
                done = 0
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        fout.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, size)
                    fout.flush()
                    os.fsync(fout.fileno())
                if done != size:
                    raise UserError(f"{src} changed while it was being copied ({done} of {size} bytes); try again")
                os.replace(tmp, dest)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(f"the disk holding {self.root} filled up while copying {src.name}; nothing was kept. "
                                "Free some space or use --models-dir on another disk") from None
            raise UserError(f"cannot copy {src} into {self.root}: {e.strerror or e}") from None

    def conversion_target(self, name: str, output: Path | None, force: bool) -> ConversionTarget:
        """Where `malhae convert --add` writes: straight into the store without -o, else -o and then a copy.

        Checked before converting, so a taken name costs seconds, not a conversion.
        """
        dest = self.check_new(name, force)
        if output is None or Path(output).expanduser().absolute() == dest.absolute():
            self.ensure_root()
            return ConversionTarget(self, dest, dest.stem, force, copy=False)
        return ConversionTarget(self, Path(output), dest.stem, force, copy=True)

    def remove(self, name: str) -> Entry:
        entry = self.get(name)
        if entry is None:
            raise self.not_found(name, removing=True)
        try:
            entry.path.unlink()
        except OSError as e:
            raise UserError(f"cannot remove {entry.path}: {e.strerror or e}") from None
        return entry


@dataclass
class ConversionTarget:
    store: Store
    output: Path  # what the converter writes
    name: str  # the name in the store
    force: bool
    copy: bool  # True: the output is elsewhere (-o) and is copied into the store afterwards

    def finish(self, converted: Path, progress: Progress | None = None) -> Entry:
        if self.copy:
            return self.store.add(converted, self.name, force=self.force, progress=progress)
        entry = self.store.get(self.name)
        assert entry is not None
        return entry


def _same_device(a: Path, directory: Path) -> bool:
    try:
        return a.stat().st_dev == directory.stat().st_dev
    except OSError:
        return False


def open_store(root: Path | None = None) -> Store:
    """The store at `root` (default: models_dir()); the directory is created on the first write, not here."""
    return Store(Path(root).expanduser() if root is not None else models_dir())
