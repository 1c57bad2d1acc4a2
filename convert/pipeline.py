"""`malhae convert` from start to finish, with nothing lost on any failure.

Order matters: everything that can be checked without writing (config, tokenizer, weight index, shapes, output path,
free disk space, tokenizer parity on a metadata-only GGUF) is checked first, so that a user learns of a problem in
seconds rather than after a long conversion. Output goes to a hidden temporary file in the target directory and is
renamed into place only when complete and proven; every temporary file is removed on any failure or Ctrl-C.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as QT

from malhae import files, units
from malhae.convert import gguf_out, parity, quantize
from malhae.convert import imatrix as imatrix_file
from malhae.convert import types as out_types
from malhae.convert.checkpoint import Checkpoint
from malhae.convert.config import NeoXConfig, read_config
from malhae.convert.vocab import read_vocab
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.gguf_info import read_info
from malhae.runtime.interrupts import Interrupts

# Progress: (stage, done, total); stages are "reading", "writing" (bytes) and "quantizing" (tensors).
Progress = Callable[[str, int, int], None]
FAMILY_LICENSES = {re.compile(r"polyglot-ko|koalpaca-polyglot|kullm-polyglot", re.I): "apache-2.0"}
SAFETY_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Result:
    path: Path
    type: str
    size: int
    n_params: int
    bits_per_weight: float
    seconds: float
    parity_texts: int
    parity_tokens: int
    pre: str
    tensor_types: dict[str, int]
    template: str | None = None  # the prompt format written as tokenizer.chat_template (None: none written)
    imatrix: str | None = None  # the importance matrix quantized with: "auto" or the file's name


def default_output(src: Path, type_name: str) -> Path:
    return Path.cwd() / f"{model_name(src)}-{type_name}.gguf"


def model_name(src: Path) -> str:
    hub = hub_id(src, None)
    return hub.split("/")[-1] if hub else src.resolve().name


def identity(src: Path, name: str | None = None, cfg: NeoXConfig | None = None) -> tuple[str | None, str, str]:
    """What the model is called: (hub id if known, its name in the GGUF, the folder's name), by which its prompt format
    is recognised (app.runtime.templates.identify, and the catalog)."""
    cfg = cfg or read_config(src)
    return hub_id(src, cfg.name_or_path), name or model_name(src), src.resolve().name


def merged_name(src: Path, merged) -> str | None:
    """A merged model's default name: the base's, then each adapter's (polyglot-ko-5.8b+my-adapter)."""
    if merged is None:
        return None
    return "+".join([model_name(src), *(a.name for a, _ in merged.adapters)])


def hub_id(src: Path, name_or_path: str | None) -> str | None:
    """The hub id when known: from a hub-cache path (models--org--name/snapshots/…) or config's _name_or_path."""
    parts = src.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
    if name_or_path and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) and not Path(name_or_path).exists():
        return name_or_path
    return None


def find_license(src: Path, name: str) -> str | None:
    readme = src / "README.md"
    if readme.is_file():
        try:
            text = readme.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        front = re.match(r"---\n(.*?)\n---", text, re.S)
        if front:
            m = re.search(r"^license:\s*(\S+)", front.group(1), re.M)
            if m:
                return m.group(1).strip("'\"")
    return next((lic for pattern, lic in FAMILY_LICENSES.items() if pattern.search(name)), None)


def _check_output(out: Path, force: bool) -> None:
    files.check_target(out, force, replace_hint="add --force to overwrite it",
                       other_hint="choose another name with -o")


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(f"not enough free disk space in {directory}: the conversion needs about "
                        f"{units.size(needed)} and {units.size(free)} are free; free some space or choose "
                        "-o on another disk")


def convert(src: Path, type_name: str, out: Path | None = None, *, force: bool = False, threads: int | None = None,
            progress: Progress | None = None, name: str | None = None, template: str | None = None,
            imatrix: str | Path | None = None, merge: list | None = None) -> Result:
    """`merge`: convert.merge.Spec values, PEFT adapters merged into the weights as they stream (read and checked
    against this checkpoint before anything is written).

    `imatrix`: "auto" (computed on the staged F16 over malhae's Korean calibration text) or an imatrix file
    (checked against this model before anything is written); None quantizes without one.

    Ctrl-C and SIGTERM are held as a flag for the whole conversion (app.runtime.interrupts: llama.cpp calls
    back into Python while it loads, logs and computes, and an interrupt raised in there was swallowed) and
    raised at the next step or progress report: KeyboardInterrupt, with every partial file removed. Once the file
    is renamed into place, a signal is too late to undo it and is dropped."""
    with Interrupts() as interrupted:
        return _convert(src, type_name, out, interrupted, force=force, threads=threads, progress=progress, name=name,
                        template=template, imatrix=imatrix, merge=merge)


def _steps(progress: Progress | None, interrupted: Interrupts) -> Callable[[str], Callable[[int, int], None]]:
    """Each stage's progress callback, which is also where a held interrupt is raised (from the main thread)."""

    def stage(name: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            interrupted.check()
            if progress:
                progress(name, done, total)

        return report

    return stage


def _convert(src: Path, type_name: str, out: Path | None, interrupted: Interrupts, *, force: bool,
             threads: int | None, progress: Progress | None, name: str | None, template: str | None,
             imatrix: str | Path | None, merge: list | None = None) -> Result:
    start = time.perf_counter()
    step = _steps(progress, interrupted)
    otype = out_types.get(type_name)
    imatrix = check_imatrix_option(otype, imatrix)
    forced = templates.get(template) if template else None
    cfg = read_config(src)
    vocab = read_vocab(src, cfg.n_vocab, {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id})
    merged = None
    if merge:
        from malhae.convert.merge import Merge

        merged = Merge(merge, src)  # an adapter of another model is refused now, not after the conversion
    ckpt = Checkpoint(src, step("reading"))
    staged = QT.F16 if otype.direct is None else otype.direct  # what is written first; quantizer types start from f16
    tensors = gguf_out.plan(cfg, ckpt, staged)
    given = None
    if isinstance(imatrix, Path):  # a file made for another model is refused now, not after the conversion
        given = imatrix_file.read(imatrix)
        imatrix_file.check_model(given, ((t.gguf_name, list(t.shape[::-1])) for t in tensors), imatrix.name)
    hub, name, folder = identity(src, name or merged_name(src, merged), cfg)
    chat = forced or templates.identify(hub, name, folder)
    # a local checkpoint is recorded by its folder's name only: the file must not carry the user's home path (people
    # share GGUF files) and its bytes should not depend on where the checkpoint happened to lie
    meta = gguf_out.Metadata(name=name, source=hub or folder, hub_id=hub,
                             license=find_license(src, hub or name), chat_template=chat.chat_template if chat else None)

    out = (out or Path.cwd() / f"{name}-{otype.name}.gguf").absolute()
    _check_output(out, force)
    own = {p.resolve() for p in (*ckpt.files, src / "config.json", src / "tokenizer.json")}
    if out.resolve() in own:
        raise UserError(f"-o {out} is one of the checkpoint's own files; write the GGUF somewhere else")
    if merged and out.resolve() in {p.resolve() for p in merged.files()}:
        raise UserError(f"-o {out} is one of an adapter's own files; write the GGUF somewhere else")
    n_params = sum(math.prod(t.shape) for t in tensors)
    staged_bytes = gguf_out.total_bytes(tensors)
    final_bytes = staged_bytes if otype.direct is not None else int(n_params * otype.bpw / 8 * 1.15)
    metadata_bytes = 8 * sum(len(t) + 16 for t in vocab.tokens) + 2**20
    needed = staged_bytes + (final_bytes if otype.direct is None else 0) + metadata_bytes + SAFETY_BYTES
    files.sweep(out.parent)  # partial files of earlier conversions that were killed outright: gigabytes
    _check_space(out.parent, needed)

    try:
        with files.partial(out, "vocab") as vocab_path:
            gguf_out.write_vocab_only(vocab_path, cfg, vocab, meta)
            parity.check(src / "tokenizer.json", vocab_path, vocab.specials, vocab.pre)
        interrupted.check()

        with files.partial(out, "staged") as staged_path, files.partial(out, "quantized") as quant_path:
            ftype = otype.ftype if otype.direct is not None else gguf.LlamaFileType.MOSTLY_F16
            gguf_out.write_model(staged_path, cfg, vocab, meta, ckpt, tensors, ftype, step("writing"), merged)
            final_path = staged_path
            if otype.direct is None:
                with files.partial(out, "imatrix") as computed:
                    used, label = (imatrix, imatrix.name) if given is not None else (None, None)
                    if imatrix == "auto":
                        _calibrate(staged_path, computed, threads, step("calibrating"))
                        used, label = computed, "auto"
                    interrupted.check()
                    quantize.quantize(staged_path, quant_path, int(otype.ftype), threads, step("quantizing"),
                                      imatrix=used, imatrix_label=label)
                staged_path.unlink()
                final_path = quant_path
            report = parity.check(src / "tokenizer.json", final_path, vocab.specials, vocab.pre)
            interrupted.check()  # the last moment to stop: after the rename the conversion is done
            os.replace(final_path, out)
            interrupted.finished()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"the disk holding {out.parent} filled up while writing; nothing was kept. Free some "
                            "space or choose -o on another disk") from e
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e

    tensor_types, size, data_bytes = summarize(out)
    return Result(path=out, type=otype.name, size=size, n_params=n_params,
                  bits_per_weight=data_bytes * 8 / n_params, seconds=time.perf_counter() - start,
                  parity_texts=report.texts, parity_tokens=report.tokens, pre=vocab.pre, tensor_types=tensor_types,
                  template=chat.name if chat else None,
                  imatrix=None if imatrix is None else "auto" if imatrix == "auto" else Path(imatrix).name)


def check_imatrix_option(otype: out_types.OutType, imatrix: str | Path | None) -> str | Path | None:
    """The --imatrix option against the type, before any work: "auto", a Path, or None."""
    if imatrix is None or imatrix == "":
        if otype.needs_imatrix:
            raise UserError(f"--type {otype.name} needs an importance matrix (llama.cpp refuses it without one); add "
                            "--imatrix auto to compute one on malhae's Korean text, or --imatrix FILE")
        return None
    if otype.direct is not None:
        raise UserError(f"--imatrix guides llama.cpp's quantizer, and --type {otype.name} is written without it; "
                        "use it with a quantized type such as q4_k_m, q3_k_m or iq3_xxs, or leave it out")
    if str(imatrix).strip().lower() == "auto":
        return "auto"
    return Path(imatrix)


def _calibrate(staged: Path, out: Path, threads: int | None, progress: Callable[[int, int], None]) -> None:
    """--imatrix auto: the importance matrix of the staged F16 over malhae's calibration corpus, into `out`."""
    from malhae.convert import importance
    from malhae.runtime.settings import LoadOptions

    datasets, text = importance.calibration(None)
    im, _, _ = importance.compute_file(LoadOptions(model=staged, threads=threads), text, datasets=datasets,
                                       progress=lambda d, t, _p: progress(d, t))
    imatrix_file.write(im, out, force=True)


def summarize(path: Path) -> tuple[dict[str, int], int, int]:
    """Count of tensors per GGML type, the file size, and the bytes of tensor data."""
    info = read_info(path)
    counts = {name: n for name, (n, _) in info.type_counts().items()}
    return counts, info.file_size, sum(t.nbytes for t in info.tensors)
