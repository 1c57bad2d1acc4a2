"""Where KoBEST docs come from: the published skt/kobest_v1 files in a local folder, the hub, or the bundled sample.

The hub repository holds one folder per task with `train.jsonl`, `validation.jsonl`, `test.jsonl` (and SentiNeg's
`test_originated.jsonl`); its automatic parquet conversion has `<task>/<split>/0000.parquet` or
`<task>/<split>-00000-of-00001.parquet`. Any of these (and .json/.csv/.tsv) is read from `--data DIR`, so the files
can be downloaded once and evaluated offline. Every row is checked before anything is scored, and a bad row is
reported as file:line, because a silently skipped or misread row changes the score.
Without data, the bundled sample (models/data/kobest-sample, written by this project, NOT KoBEST) is used so that the
command and its tests run anywhere — its scores mean nothing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from malhae import nfc
from malhae.errors import UserError
from malhae.eval.kobest.tasks import Doc, Task
from malhae.files import cannot_read, parse_json, read_user_text

HUB_ID = "skt/kobest_v1"
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
MAX_FILE = 1 << 28  # a KoBEST split is a few MB; a file past 256 MB is not one


@dataclass(frozen=True)
class Source:
    kind: str  # "dir", "hub" or "sample"
    path: Path | None = None

    @property
    def label(self) -> str:
        if self.kind == "hub":
            return f"{HUB_ID} (hub)"
        if self.kind == "sample":
            return "bundled sample, not KoBEST"
        return str(self.path)


def sample_dir() -> Path:
    return Path(str(resources.files("malhae.models").joinpath("data", "kobest-sample")))


def source(data: Path | None, hub: bool) -> Source:
    if data is not None and hub:
        raise UserError("give either --data DIR or --hub, not both")
    if hub:
        return Source("hub")
    if data is None:
        return Source("sample", sample_dir())
    data = data.expanduser()
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder: give the folder with the skt/kobest_v1 files "
                        "(boolq/, copa/, hellaswag/, sentineg/, wic/)")
    return Source("dir", data)


def load(src: Source, task: Task, split: str) -> list[Doc]:
    """The validated docs of one split, in file order (the order matters: the harness shuffles it with a seed)."""
    if src.kind == "hub":
        return _load_hub(task, split)
    assert src.path is not None
    files = find_files(src.path, task.name, split)
    docs: list[Doc] = []
    for f in files:
        docs += [validate(task, row, where) for row, where in read_rows(f)]
    if not docs:
        raise UserError(f"{files[0]} has no rows; KoBEST {task.title} needs its {split} split")
    return docs


def find_files(root: Path, task: str, split: str) -> list[Path]:
    folder = root / task
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return [folder / f"{split}{ext}"]
    shards = sorted(folder.glob(f"{split}-*.parquet")) or sorted((folder / split).glob("*.parquet"))
    if shards:
        return shards
    raise UserError(f"no {split} file for {task} in {root}: expected {folder / (split + '.jsonl')} (as in "
                    f"{HUB_ID}; .json, .csv, .tsv and .parquet also work)")


def read_rows(path: Path):
    """(row, "file:line") pairs; JSON Lines, a JSON array, CSV/TSV with a header, or parquet (needs pyarrow)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    text = read_user_text(path, "data file", limit=MAX_FILE).removeprefix("\ufeff")  # a BOM: Excel's CSV
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            yield row, f"{path}:{reader.line_num}"
        return
    if text.lstrip().startswith("["):
        rows = parse_json(text, f"data file {path}")
        for i, row in enumerate(rows):
            yield row, f"{path}: item {i + 1}"
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{n}: the row", "each line must be one JSON object")
        yield row, f"{path}:{n}"


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is parquet, which needs pyarrow: pip install pyarrow (or use the .jsonl files "
                        f"of {HUB_ID})") from None
    try:
        table = pq.read_table(path)
    except OSError as e:
        raise cannot_read(e, path, "data file") from None
    for i, row in enumerate(table.to_pylist()):
        yield row, f"{path}: row {i + 1}"


def validate(task: Task, row: object, where: str) -> Doc:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with {', '.join(task.fields)}, label")
    doc: Doc = dict(row)
    for field in task.fields:
        value = doc.get(field)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: {task.name} needs a text field '{field}'"
                            + (" (missing)" if value is None else f" (got {value!r})"))
    label = doc.get("label")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.n_labels:
        raise UserError(f"{where}: 'label' must be an integer 0-{task.n_labels - 1} for {task.name} (got {label!r})")
    doc["label"] = label
    # read as composed (NFC), as the docs are scored (evaluate.composed): a copy saved decomposed says 원인 too
    if task.connector_field and nfc.compose(doc[task.connector_field]).strip() not in dict(task.connector_map):
        raise UserError(f"{where}: '{task.connector_field}' must be one of "
                        f"{', '.join(k for k, _ in task.connector_map)} (got {doc[task.connector_field]!r})")
    return doc


def _load_hub(task: Task, split: str) -> list[Doc]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"--hub needs the datasets library (pip install datasets); or download {HUB_ID}'s files "
                        "and pass --data DIR") from None
    try:
        rows = datasets.load_dataset(HUB_ID, task.name, split=split)
    except Exception as e:  # network, authentication, a missing split: all end the same way for the user
        raise UserError(f"cannot load {HUB_ID}/{task.name} ({split}) from the hub ({type(e).__name__}: {e}); "
                        "download the files and pass --data DIR") from None
    return [validate(task, dict(row), f"{HUB_ID}/{task.name}/{split} row {i + 1}") for i, row in enumerate(rows)]
