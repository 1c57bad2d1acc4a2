"""The `malhae` command line: parse, call the library, render. No logic of its own lives here.

Every command's failures that the user can fix arrive as UserError and leave as one line on stderr with exit code 2;
Ctrl-C exits 130; anything else is a bug, reported in one line unless --debug asks for the traceback.
Heavy modules (llama.cpp, numpy, the converter) are imported inside commands to keep start-up fast.
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

import typer

try:  # typer ≥ 0.29 vendors click; older versions raise the click package's usage errors
    from typer._click.exceptions import ClickException as _UsageError
except ImportError:  # pragma: no cover
    from click import ClickException as _UsageError

from app.errors import UserError

app = typer.Typer(
    name="malhae",
    help="말해 — a local, offline Korean assistant on llama.cpp (Polyglot-Ko family).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log output."),
) -> None:
    from app import settings

    settings.DEBUG = debug
    settings.VERBOSE = verbose


@app.command()
def convert(
    src: Path | None = typer.Argument(None, help="Hugging Face model directory (config.json, tokenizer.json, "
                                      "weights)."),
    type_name: str = typer.Option("f16", "--type", "-t", help="Output type: f32, f16, bf16, q8_0, q6_k, q5_k_m, "
                                  "q4_k_m, q4_0, q3_k_m, q2_k, iq4_nl, … (see `malhae convert --list-types`)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file [default: ./<model>-<type>.gguf]."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits with transformers afterwards."),
    threads: int | None = typer.Option(None, "--threads", help="Threads for quantizing [default: all cores]."),
    list_types: bool = typer.Option(False, "--list-types", help="List the output types and exit."),
) -> None:
    """Convert a Polyglot-Ko (GPT-NeoX) checkpoint into a GGUF file, proven to tokenize like the original."""
    from app import render
    from app.llama import init
    from app.settings import VERBOSE
    from convert import pipeline
    from convert import types as out_types

    if list_types:
        render.types_table(out_types.TYPES)
        return
    if src is None:
        raise UserError("give the model directory: malhae convert ./polyglot-ko-1.3b --type q4_k_m")
    init(VERBOSE)
    with render.ConvertProgress() as progress:
        result = pipeline.convert(src, type_name, output, force=force, threads=threads, progress=progress.update)
    render.convert_summary(result)
    if verify:
        from convert.verify import verify as run_verify

        report = run_verify(src, result.path, result.type, threads=threads)
        render.verify_table(report)
        if report.passed is False:
            raise UserError(f"verification failed: {report.criterion} does not hold (the table above shows where)",
                            exit_code=1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args

    def _terminate(signum: int, frame: object) -> None:  # SIGTERM cleans up like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(args=args, prog_name="malhae", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted (중단됨)")
        return 130
    except _UsageError as e:
        e.show()
        return e.exit_code
    except UserError as e:
        if debug:
            traceback.print_exc()
        _error(str(e))
        return e.exit_code
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so in one line, with the way to see more
        if debug:
            traceback.print_exc()
        _error(f"internal error ({type(e).__name__}: {e}); run again with --debug and report the traceback")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130:  # typer turns KeyboardInterrupt into Exit(130)
        _error("interrupted (중단됨)")
    return code


def _error(message: str) -> None:
    sys.stderr.write(f"malhae: error: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
