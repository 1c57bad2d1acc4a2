"""Process-wide flags set once by the CLI's root options (the library never reads argv)."""

from pathlib import Path

DEBUG = False
VERBOSE = False
MODELS_DIR: Path | None = None  # --models-dir: where the model store is, for this run only
