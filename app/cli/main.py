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

from malhae.cli import cache, convert, evaluate, models, run, serve, server_client
from malhae.cli.options import Command, Group
from malhae.errors import UserError
from malhae.ui import printable

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="malhae",
    help="말해 — a local, offline Korean assistant on llama.cpp (Polyglot-Ko family).",
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)


def _version(asked: bool) -> None:
    """--version: the installed package's version (its metadata, so it is the one pip installed), then exit."""
    if not asked:
        return
    from importlib import metadata

    try:
        version = metadata.version("malhae")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "(not installed: pip install -e . gives it a version)"
    sys.stdout.write(f"malhae {version}\n")
    raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log output."),
    models_dir: Path | None = typer.Option(None, "--models-dir", metavar="DIR", help="The model store for this run "
                                           "(default: $MALHAE_HOME/models, else the user data directory's "
                                           "models/)."),
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                 help="Print malhae's version and exit."),
) -> None:
    from malhae import flags
    from malhae.store import models as store

    flags.DEBUG = debug
    flags.VERBOSE = verbose
    flags.MODELS_DIR = models_dir
    store.new_run()  # notices said once per run (main() may run many commands in one process: tests do)


app.command(cls=Command)(convert.convert)
app.command("complete", cls=Command)(run.complete)
app.command("ask", cls=Command)(run.ask)
app.command(cls=Command)(run.chat)
app.command(cls=Command)(serve.serve)
app.command("ps", cls=Command)(server_client.ps)
app.command("stop", cls=Command)(server_client.stop)
app.command(cls=Command)(evaluate.bench)
app.command(cls=Command)(models.info)
app.command(cls=Command)(models.recommend)
app.command(cls=Command)(convert.pull)
app.command(cls=Command)(convert.imatrix)
app.add_typer(evaluate.app, name="eval")
app.add_typer(models.app, name="models")
app.add_typer(cache.app, name="cache")


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
    """One line, whatever the message holds: a server's error text or a file name may carry newlines or terminal
    escapes (ui.printable), and none of them may act on the user's terminal."""
    sys.stderr.write(f"malhae: error: {printable(message)}\n")
    sys.stderr.flush()
