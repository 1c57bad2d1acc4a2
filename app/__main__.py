"""`python -m malhae` and the `malhae` command's entry point (pyproject's [project.scripts]).

The command line imports Typer, Rich and the rest only here, inside `main`, so that a Ctrl-C while they load (the
first few hundred milliseconds) ends like one at any later moment: one line and exit 130, not an import traceback.
"""

import sys

INTERRUPTED = "malhae: error: interrupted (중단됨)\n"  # app.cli.main's wording for the same event


def main() -> int:
    try:
        from malhae.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
