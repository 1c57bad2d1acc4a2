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

from app import config as _config
from app.errors import UserError

app = typer.Typer(
    name="malhae",
    help="말해 — a local, offline Korean assistant on llama.cpp (Polyglot-Ko family).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


eval_app = typer.Typer(
    help="Measure a model on the GGUF itself: perplexity, KoBEST, quantization loss (평가).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(eval_app, name="eval")

models_app = typer.Typer(
    help="Your models (모델): list, import, remove, choose the default; the catalog of the Polyglot-Ko family.",
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(models_app, name="models")


@models_app.callback()
def _models(ctx: typer.Context,
            json_out: bool = typer.Option(False, "--json", help="List the models as JSON.")) -> None:
    """List the models in the store (no subcommand), or manage them."""
    if ctx.invoked_subcommand is None:
        from app import config, models_view
        from app.store import open_store

        store, settings = open_store(), config.load()
        models_view.models_table(store.entries(), store.root, settings.default_model, settings.path, json_out)


@models_app.command("import")
def models_import(
    file: Path = typer.Argument(..., help="The .gguf file to add to the store."),
    name: str | None = typer.Option(None, "--name", help="Its name in the store (default: the file's name)."),
    move: bool = typer.Option(False, "--move", help="Move the file instead of copying it."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a model of the same name."),
) -> None:
    """Copy (or move) a GGUF file into the store, to run it by name: malhae chat -m NAME."""
    from app import models_view, render
    from app.store import open_store

    store = open_store()
    size = file.stat().st_size if file.is_file() else 0
    with models_view.CopyProgress(f"{'moving' if move else 'copying'} {file.name}", size) as progress:
        entry = store.add(file, name, move=move, force=force, progress=progress.update)
    render.out.print(f"added {entry.name} ({entry.type}, {entry.size / 1e9:.2f} GB) to {store.root}; run it with "
                     f"malhae chat -m {entry.name}", markup=False, soft_wrap=True)


@models_app.command("rm")
def models_rm(
    name: str = typer.Argument(..., help="The model's name in the store (see `malhae models`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (needed without a terminal)."),
) -> None:
    """Delete a model from the store (asks first)."""
    from app import config, models_view, render
    from app.store import open_store

    store = open_store()
    entry = store.get(name)
    if entry is None:
        raise store.not_found(name)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"removing '{entry.name}' deletes {entry.path}; add --yes to confirm without a terminal")
        if not typer.confirm(f"delete {entry.name} ({entry.size / 1e9:.2f} GB, {entry.path})?", default=False):
            raise typer.Exit(1)
    settings = config.load()
    store.remove(entry.name)
    render.out.print(f"removed {entry.name} ({entry.path})", markup=False, soft_wrap=True)
    if models_view.is_default(entry, settings.default_model):
        config.set_default_model(None, settings.path)
        render.note(f"it was the default model; default_model removed from {settings.path} (the bundled demo is the "
                    "default until you set another with `malhae models default NAME`)")


@models_app.command("default")
def models_default(
    name: str | None = typer.Argument(None, help="A name from `malhae models` or a path to a .gguf file; none: "
                                      "show the current default."),
    clear: bool = typer.Option(False, "--clear", help="Remove the default (the bundled demo is used again)."),
) -> None:
    """Show or set the model used when --model is not given (default_model in the settings file)."""
    from app import config, models, models_view, render

    settings = config.load()
    if clear:
        config.set_default_model(None, settings.path)
        render.out.print(f"default model cleared in {settings.path}", markup=False, soft_wrap=True)
        return
    if name is None:
        resolved = None
        if settings.default_model:
            try:
                resolved = str(models.resolve(settings.default_model))
            except UserError as e:
                resolved = f"(not found: {e})"
        models_view.default_line(settings.default_model, settings.path, settings.exists, resolved)
        return
    value = models.default_value(name)
    config.set_default_model(value, settings.path)
    render.out.print(f"default model: {value} (default_model in {settings.path})", markup=False, soft_wrap=True)


@models_app.command("catalog")
def models_catalog(
    json_out: bool = typer.Option(False, "--json", help="Print the catalog, sizes and picks as JSON."),
) -> None:
    """The Polyglot-Ko family: hub ids, sizes per quantization (computed) and the best type per VRAM size."""
    from app import catalog, catalog_view

    catalog_view.catalog(catalog.load(), json_out)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log output."),
    models_dir: Path | None = typer.Option(None, "--models-dir", help="The model store for this run (default: "
                                           "$MALHAE_HOME/models, else the user data directory's models/)."),
) -> None:
    from app import settings

    settings.DEBUG = debug
    settings.VERBOSE = verbose
    settings.MODELS_DIR = models_dir


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
    template: str | None = typer.Option(None, "--template", help="Prompt format written as the GGUF's chat "
                                        "template: base, koalpaca, kullm (default: from the model's name or hub id; "
                                        "none when unknown)."),
    add: bool = typer.Option(False, "--add", help="Add the result to the model store (without -o, write it "
                             "there directly) as --name, else <model>-<type>."),
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
    target = None
    if add:  # a taken store name is refused now, not after minutes of converting
        from app.store import open_store

        target = open_store().conversion_target(name or f"{pipeline.model_name(src)}-{out_types.get(type_name).name}",
                                                output, force)
        output = target.output
    init(VERBOSE)
    with render.ConvertProgress() as progress:
        result = pipeline.convert(src, type_name, output, force=force, threads=threads, progress=progress.update,
                                  name=name, template=template)
    render.convert_summary(result)
    if target is not None:
        from app import models_view

        with models_view.CopyProgress(f"adding {result.path.name} to the store", result.size) as copying:
            entry = target.finish(result.path, progress=copying.update)
        render.out.print(f"in the store as {entry.name}: malhae chat -m {entry.name}", markup=False, soft_wrap=True)
    if verify:
        from convert.verify import verify as run_verify

        report = run_verify(src, result.path, result.type, threads=threads)
        render.verify_table(report)
        if report.passed is False:
            raise UserError(f"verification failed: {report.criterion} does not hold (the table above shows where)",
                            exit_code=1)


_MODEL_HELP = ("A name from `malhae models` or a .gguf file (default: default_model in the settings file, else the "
               "bundled demo).")
_GPU_HELP = f"auto, 0 (CPU only) or a number of layers (default: {_config.GPU_LAYERS_DEFAULT})."


def _default(key: str) -> str:
    return f"(default: {_config.SAMPLING_DEFAULTS[key]})"


def _oneshot(kind: str):
    """`complete` and `ask` share every option; only how the prompt is framed differs."""

    def command(
        prompt: str | None = typer.Argument(None, help="The text; `-` or nothing reads it from a pipe."),
        model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
        max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="Most tokens to generate "
                                              f"(default: {_config.ONESHOT_MAX_TOKENS})."),
        temperature: float | None = typer.Option(None, "--temperature", help=f"0 = greedy {_default('temperature')}."),
        top_p: float | None = typer.Option(None, "--top-p", help=_default("top_p")),
        top_k: int | None = typer.Option(None, "--top-k", help=_default("top_k")),
        min_p: float | None = typer.Option(None, "--min-p", help=_default("min_p")),
        repeat_penalty: float | None = typer.Option(None, "--repeat-penalty", help=_default("repeat_penalty")),
        repeat_last_n: int | None = typer.Option(None, "--repeat-last-n", help=_default("repeat_last_n")),
        seed: int | None = typer.Option(None, "--seed", help="Fix the sampling seed for repeatable output."),
        stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
        ctx: int | None = typer.Option(None, "--ctx", help="Context size (default: the model's, at most 4096)."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
        gpu_layers: str | None = typer.Option(None, "--gpu-layers", help=_GPU_HELP),
        template: str | None = typer.Option(None, "--template", help="Prompt format for ask: base, koalpaca, "
                                            "kullm (default: the GGUF's chat template, else from the model's "
                                            "name)."),
        json_out: bool = typer.Option(False, "--json", help="Print text and statistics as JSON."),
    ) -> None:
        from app import oneshot, render
        from app.engine import Sampling
        from app.settings import VERBOSE

        settings = _config.load()
        values = _config.sampling_values(kind, {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                                "min_p": min_p, "repeat_penalty": repeat_penalty,
                                                "repeat_last_n": repeat_last_n, "seed": seed,
                                                "max_tokens": max_tokens}, settings)
        sampling = Sampling(**values, stop=tuple(stop))
        run_opts = _config.runtime_values({"ctx": ctx, "threads": threads, "gpu_layers": gpu_layers}, settings)
        text = oneshot.read_prompt(prompt)
        run = oneshot.run(kind, text, model, sampling, n_ctx=run_opts["ctx"], threads=run_opts["threads"],
                          gpu_layers=run_opts["gpu_layers"], template=template, verbose=VERBOSE, notify=render.note)
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
    model: str | None = typer.Argument(None, help=_MODEL_HELP),
    llama_bench: Path | None = typer.Option(None, "--llama-bench", help="Also run this llama-bench and compare."),
    n_prompt: int = typer.Option(512, "--prompt", "-p", help="Prompt tokens for the prompt-speed test."),
    n_gen: int = typer.Option(128, "--gen", "-n", help="Tokens for the decode-speed test."),
    repetitions: int = typer.Option(3, "--repetitions", "-r"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    gpu_layers: str | None = typer.Option(None, "--gpu-layers", help=_GPU_HELP),
    ctx: int | None = typer.Option(None, "--ctx", help="Context size (default: what the test needs; the settings "
                                   "file's ctx is not used here)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Measure prompt and decode tokens/s through malhae's engine (and llama-bench, side by side)."""
    from app import bench as benchmod
    from app import models, render
    from app.engine import Engine
    from app.settings import VERBOSE

    run_opts = _config.runtime_values({"threads": threads, "gpu_layers": gpu_layers}, _config.load())
    threads, gpu_layers = run_opts["threads"], run_opts["gpu_layers"]
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
def info(
    model: str | None = typer.Argument(None, help="GGUF file or model name (default: the bundled demo)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Context for the memory estimate (default: the model's, "
                                   "at most 4096, as the engine uses)."),
    gpu_layers: str = typer.Option("auto", "--gpu-layers", help="auto (this machine's free VRAM), 0 (CPU only) or "
                                   "a number of layers."),
    vram: float | None = typer.Option(None, "--vram", help="Plan for a GPU with this many GiB free instead "
                                      "(what if)."),
    json_out: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
) -> None:
    """Describe a GGUF (정보): architecture, size, tensor types, tokenizer, chat template and memory needed."""
    from app import models, render
    from app.info import describe

    path = models.resolve(model, render.note)
    render.info_report(describe(path, n_ctx=ctx, gpu_layers=gpu_layers, vram_gib=vram), json_out)


@app.command()
def recommend(
    vram: float | None = typer.Option(None, "--vram", help="GiB of free VRAM to plan for; 0 = no GPU (default: "
                                      "this machine's NVIDIA GPUs, free memory now)."),
    ram: float | None = typer.Option(None, "--ram", help="GiB of RAM to plan for without a GPU (default: this "
                                     "machine's)."),
    json_out: bool = typer.Option(False, "--json", help="Print the picks as JSON."),
) -> None:
    """Which catalog model and quantization fit this machine (추천), and the pull command for each."""
    from app import catalog, catalog_view
    from app import recommend as rec

    machine = rec.machine(vram, ram)
    rows = [(e, rec.pick(e, vram_bytes=machine.vram_bytes, ram_bytes=machine.ram_bytes)) for e in catalog.load()]
    catalog_view.recommendation(machine, rows, json_out)


@app.command()
def pull(
    model: str = typer.Argument(..., help="A catalog name (see `malhae models catalog`) or a hub id "
                                "(org/name)."),
    type_name: str = typer.Option("q4_k_m", "--type", "-t", help="Output type (see `malhae convert --list-types`)."),
    name: str | None = typer.Option(None, "--name", help="Name in the store (default: <model>-<type>)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a model of the same name in the store."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit on the hub (default: main)."),
    threads: int | None = typer.Option(None, "--threads", help="Threads for quantizing (default: all cores)."),
) -> None:
    """Download a checkpoint from the Hugging Face hub, convert it and add it to the store (받기)."""
    from app import catalog_view, render
    from app import pull as pull_mod
    from app.llama import init
    from app.settings import VERBOSE

    init(VERBOSE)
    with catalog_view.LazyConvertProgress() as progress:
        pulled = pull_mod.pull(model, type_name, name=name, force=force, revision=revision, threads=threads,
                               progress=progress.update, before_convert=catalog_view.pull_starting)
    render.convert_summary(pulled.result)
    catalog_view.pulled(pulled)


@app.command()
def chat(
    model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    template: str | None = typer.Option(None, "--template", help="Prompt format: base, koalpaca, kullm "
                                        "(default: the GGUF's chat template, else from the model's name)."),
    system: str | None = typer.Option(None, "--system", help="System text (default: the template's)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Context size (default: the model's, at most 4096)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    gpu_layers: str | None = typer.Option(None, "--gpu-layers", help=_GPU_HELP),
    temperature: float | None = typer.Option(None, "--temperature", help=f"0 = greedy {_default('temperature')}."),
    top_p: float | None = typer.Option(None, "--top-p", help=_default("top_p")),
    top_k: int | None = typer.Option(None, "--top-k", help=_default("top_k")),
    min_p: float | None = typer.Option(None, "--min-p", help=_default("min_p")),
    repeat_penalty: float | None = typer.Option(None, "--repeat-penalty", help=_default("repeat_penalty")),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n",
                                          help=f"Most tokens per answer {_default('max_tokens')}."),
    seed: int | None = typer.Option(None, "--seed", help="Fix the sampling seed for repeatable answers."),
    no_color: bool = typer.Option(False, "--no-color", help="No colours or styles (also: the NO_COLOR variable)."),
) -> None:
    """Talk with a model (대화): streaming answers, input history, /commands; /help inside for more."""
    from app import chat as chat_mod
    from app.engine import Sampling
    from app.settings import VERBOSE

    settings = _config.load()
    sampling = Sampling(**_config.sampling_values("chat", {
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p, "repeat_penalty": repeat_penalty,
        "max_tokens": max_tokens, "seed": seed}, settings))
    run_opts = _config.runtime_values({"ctx": ctx, "threads": threads, "gpu_layers": gpu_layers}, settings)
    chat_mod.run(model=model, template=template, system=system, sampling=sampling, ctx=run_opts["ctx"],
                 threads=run_opts["threads"], gpu_layers=run_opts["gpu_layers"], no_color=no_color, verbose=VERBOSE)


@eval_app.command("ppl")
def eval_ppl(
    model: str | None = typer.Argument(None, help="GGUF file or store name (default: the bundled demo)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score (e.g. a held-out corpus)."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window; the second half of each is scored."),
    batch: int = typer.Option(2048, "--batch", help="Tokens per decode; batch/ctx windows go together."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    gpu_layers: str = typer.Option("auto", "--gpu-layers", help="auto, 0 (CPU only) or a number of layers."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Perplexity on a text, computed as llama.cpp's llama-perplexity computes it (same number)."""
    from app import models, ppl_render, render
    from app import perplexity as ppl
    from app.llama import init
    from app.settings import VERBOSE

    ppl.read_text(text)  # a wrong --text is the likelier mistake: say so before anything else
    init(VERBOSE)
    path = models.resolve(model, render.note)
    with ppl_render.WindowProgress("perplexity", "ppl {:.3f}") as progress:
        result = ppl.run(path, text, n_ctx=ctx, n_batch=batch, threads=threads, gpu_layers=gpu_layers,
                         progress=progress.update, notify=render.note)
    ppl_render.ppl_result(result, json_out)


@eval_app.command("compare")
def eval_compare(
    model_a: str = typer.Argument(..., help="Reference GGUF (e.g. the F16 file) or store name."),
    model_b: str = typer.Argument(..., help="GGUF to measure against it (e.g. a quantization)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window; the second half of each is scored."),
    batch: int = typer.Option(2048, "--batch", help="Tokens per decode; batch/ctx windows go together."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantization loss of B against A: mean KL divergence, top-1 agreement, perplexity of each and their ratio."""
    from app import compare, models, ppl_render, render
    from app.llama import init
    from app.perplexity import read_text
    from app.settings import VERBOSE

    read_text(text)  # a wrong --text is the likelier mistake: say so before loading two models
    init(VERBOSE)
    path_a, path_b = models.resolve(model_a, render.note), models.resolve(model_b, render.note)
    with ppl_render.WindowProgress("comparing", "KL {:.5f}") as progress:
        result = compare.run(path_a, path_b, text, n_ctx=ctx, n_batch=batch, threads=threads,
                             progress=progress.update, notify=render.note)
    ppl_render.compare_result(result, json_out)


@eval_app.command("kobest")
def eval_kobest(
    model: str | None = typer.Argument(None, help="GGUF file or store name (default: the bundled demo)."),
    tasks: str = typer.Option("copa,hellaswag,boolq,sentineg,wic", "--tasks", show_default=False,
                              help="Comma-separated tasks (default: all five, copa,hellaswag,boolq,sentineg,wic)."),
    shots: str = typer.Option("0,5,10,50", "--shots", show_default=False,
                              help="Few-shot counts, comma-separated (default: 0,5,10,50, as in the model card)."),
    data_dir: Path | None = typer.Option(None, "--data", help="Folder with the skt/kobest_v1 files "
                                         "(<task>/train.jsonl, test.jsonl; default: the bundled sample)."),
    hub: bool = typer.Option(False, "--hub", help="Load skt/kobest_v1 from the hub (needs `datasets` and a network)."),
    limit: int | None = typer.Option(None, "--limit", help="Docs per task, for a quick run (default: all)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    gpu_layers: str = typer.Option("auto", "--gpu-layers", show_default=False,
                                   help="auto, 0 (CPU only) or a number of layers (default: auto)."),
    precise: bool = typer.Option(False, "--precise", help="f32 K/V cache, no flash attention: slower; scores move "
                                 "less with how the choices are batched."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """KoBEST macro F1 (COPA, HellaSwag, BoolQ, SentiNeg, WiC) with the prompts of the Polyglot-Ko model card."""
    from app import models, render
    from app.kobest import data, evaluate
    from app.kobest import render as kobest_render
    from app.kobest.tasks import select
    from app.llama import init
    from app.settings import VERBOSE

    try:
        shot_counts = list(dict.fromkeys(int(k) for k in shots.split(",") if k.strip()))
    except ValueError:
        raise UserError(f"--shots {shots!r}: give numbers separated by commas, e.g. 0,5,10,50") from None
    evaluate.check_options(limit, shot_counts)
    chosen = select(tasks)
    src = data.source(data_dir, hub)
    if src.kind == "sample":
        render.note("no --data given: using the bundled sample (models/data/kobest-sample), written by malhae — "
                    "not KoBEST, its scores mean nothing. Pass --data DIR with the skt/kobest_v1 files.")
    init(VERBOSE)
    path = models.resolve(model, render.note)
    with kobest_render.KobestProgress() as progress:
        report = evaluate.evaluate(path, src, chosen, shot_counts, limit=limit, threads=threads,
                                   gpu_layers=gpu_layers, precise=precise, progress=progress.update,
                                   notify=render.note)
    kobest_render.table(report, json_out)


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
