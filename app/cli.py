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
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: ./<model>-<type>.gguf)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits with transformers afterwards."),
    threads: int | None = typer.Option(None, "--threads", help="Threads for quantizing (default: all cores)."),
    list_types: bool = typer.Option(False, "--list-types", help="List the output types and exit."),
    name: str | None = typer.Option(None, "--name", help="The model's name in the GGUF (default: the folder's, "
                                    "or the hub id's)."),
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
        result = pipeline.convert(src, type_name, output, force=force, threads=threads, progress=progress.update,
                                  name=name)
    render.convert_summary(result)
    if verify:
        from convert.verify import verify as run_verify

        report = run_verify(src, result.path, result.type, threads=threads)
        render.verify_table(report)
        if report.passed is False:
            raise UserError(f"verification failed: {report.criterion} does not hold (the table above shows where)",
                            exit_code=1)


def _oneshot(kind: str):
    """`complete` and `ask` share every option; only how the prompt is framed differs."""

    def command(
        prompt: str | None = typer.Argument(None, help="The text; `-` or nothing reads it from a pipe."),
        model: str | None = typer.Option(None, "--model", "-m", help="GGUF file (default: the bundled demo)."),
        max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
        temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy (deterministic)."),
        top_p: float = typer.Option(0.95, "--top-p"),
        top_k: int = typer.Option(40, "--top-k"),
        min_p: float = typer.Option(0.05, "--min-p"),
        repeat_penalty: float = typer.Option(1.1, "--repeat-penalty"),
        repeat_last_n: int = typer.Option(64, "--repeat-last-n"),
        seed: int | None = typer.Option(None, "--seed", help="Fix the sampling seed for repeatable output."),
        stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
        ctx: int | None = typer.Option(None, "--ctx", help="Context size (default: the model's, at most 4096)."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
        gpu_layers: str = typer.Option("auto", "--gpu-layers", help="auto, 0 (CPU only) or a number of layers."),
        template: str | None = typer.Option(None, "--template", help="Prompt format for ask: base, koalpaca, "
                                            "kullm (default: from the model's name)."),
        json_out: bool = typer.Option(False, "--json", help="Print text and statistics as JSON."),
    ) -> None:
        from app import oneshot, render
        from app.engine import Sampling
        from app.settings import VERBOSE

        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                            max_tokens=max_tokens, stop=tuple(stop))
        text = oneshot.read_prompt(prompt)
        run = oneshot.run(kind, text, model, sampling, n_ctx=ctx, threads=threads, gpu_layers=gpu_layers,
                          template=template, verbose=VERBOSE, notify=render.note)
        if json_out:
            render.json_result(run.collect())
        else:
            render.stream(run)

    command.__doc__ = {
        "complete": "Continue a text as it is (raw completion, for base models).",
        "ask": "Ask one question, framed in the model's prompt format, and print the answer.",
    }[kind]
    return command


app.command("complete")(_oneshot("complete"))
app.command("ask")(_oneshot("ask"))


@app.command()
def bench(
    model: str | None = typer.Argument(None, help="GGUF file (default: the bundled demo)."),
    llama_bench: Path | None = typer.Option(None, "--llama-bench", help="Also run this llama-bench and compare."),
    n_prompt: int = typer.Option(512, "--prompt", "-p", help="Prompt tokens for the prompt-speed test."),
    n_gen: int = typer.Option(128, "--gen", "-n", help="Tokens for the decode-speed test."),
    repetitions: int = typer.Option(3, "--repetitions", "-r"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    gpu_layers: str = typer.Option("auto", "--gpu-layers", help="auto, 0 (CPU only) or a number of layers."),
    ctx: int | None = typer.Option(None, "--ctx"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Measure prompt and decode tokens/s through malhae's engine (and llama-bench, side by side)."""
    from app import bench as benchmod
    from app import models, render
    from app.engine import Engine
    from app.settings import VERBOSE

    path = models.resolve(model, render.note)
    with Engine(path, n_ctx=ctx or max(n_prompt + 16, 16 + n_gen + 8), threads=threads, gpu_layers=gpu_layers,
                verbose=VERBOSE, notify=render.note) as engine:
        pp, tg = benchmod.run_engine(engine, n_prompt, n_gen, repetitions)
        up_pp = up_tg = None
        if llama_bench:
            up_pp, up_tg = benchmod.run_llama_bench(llama_bench, path, n_prompt, n_gen, engine.threads,
                                                    engine.n_gpu_layers, repetitions)
        result = benchmod.BenchResult(pp, tg, repetitions, up_pp, up_tg)
        render.bench_table(result, engine, n_prompt, n_gen, json_out)


@app.command()
def chat(
    model: str | None = typer.Option(None, "--model", "-m", help="GGUF file (default: the bundled demo)."),
    template: str | None = typer.Option(None, "--template", help="Prompt format: base, koalpaca, kullm "
                                        "(default: from the model's name)."),
    system: str | None = typer.Option(None, "--system", help="System text (default: the template's)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Context size (default: the model's, at most 4096)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    gpu_layers: str = typer.Option("auto", "--gpu-layers", help="auto, 0 (CPU only) or a number of layers."),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = typer.Option(40, "--top-k"),
    min_p: float = typer.Option(0.05, "--min-p"),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty"),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per answer."),
    seed: int | None = typer.Option(None, "--seed", help="Fix the sampling seed for repeatable answers."),
    no_color: bool = typer.Option(False, "--no-color", help="No colours or styles (also: the NO_COLOR variable)."),
) -> None:
    """Talk with a model (대화): streaming answers, input history, /commands; /help inside for more."""
    from app import chat as chat_mod
    from app.engine import Sampling
    from app.settings import VERBOSE

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed)
    chat_mod.run(model=model, template=template, system=system, sampling=sampling, ctx=ctx, threads=threads,
                 gpu_layers=gpu_layers, no_color=no_color, verbose=VERBOSE)


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
