"""The `malhae` command line: Typer only — parse the options, call the library, render its answer.

main (the root command and exit codes) · options (the flags several commands share) · run (complete, ask, chat) ·
convert (convert, pull) · models (models …, info, recommend) · evaluate (eval …, bench).
Heavy modules (llama.cpp, numpy, the converter) are imported inside commands to keep start-up fast.
"""

from malhae.cli.main import app, main

__all__ = ["app", "main"]
