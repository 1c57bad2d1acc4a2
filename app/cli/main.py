"""The `malhae` root command: process-wide options, the command groups, and how any failure leaves the process.

Every command's failures that the user can fix arrive as UserError and leave as one line on stderr with exit code 2;
Ctrl-C exits 130; anything else is a bug, reported in one line unless --debug asks for the traceback.
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

from malhae.cli import convert, evaluate, models, run, serve
from malhae.errors import UserError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="malhae",
    help="말해 — a local, offline Korean assistant on llama.cpp (Polyglot-Ko family).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log output."),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="The model store for this run (default: "
                                           "$MALHAE_HOME/models, else the user data directory's models/)."),
) -> None:
    from malhae import flags

    flags.DEBUG = debug
    flags.VERBOSE = verbose
    flags.MODELS_DIR = models_dir


app.command()(convert.convert)
app.command("complete")(run.complete)
app.command("ask")(run.ask)
app.command()(run.chat)
app.command()(serve.serve)
app.command()(evaluate.bench)
app.command()(models.info)
app.command()(models.recommend)
app.command()(convert.pull)
app.command()(convert.imatrix)
app.add_typer(evaluate.app, name="eval")
app.add_typer(models.app, name="models")


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
    except _UsageError as e:  # click's usage block (Usage, Try, a blank line, Error) as malhae's one line
        ctx = getattr(e, "ctx", None)
        where = f"; see `{ctx.command_path} -h`" if ctx is not None else ""
        _error(f"{e.format_message().rstrip('.')}{where}")
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
