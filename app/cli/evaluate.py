"""`malhae eval …` (perplexity, quantization loss, KoBEST) and `malhae bench` (speed against llama-bench).

Threads and GPU layers come from flag > settings file > built-in, as everywhere. The settings file's `ctx` is not
used here: a perplexity window is a measurement parameter (only perplexities at the same --ctx compare), KoBEST uses
the model's trained window as the harness does, and bench sizes its own context.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from malhae.cli import options as o
from malhae.errors import UserError

app = typer.Typer(
    help="Measure a model on the GGUF itself: perplexity, KoBEST, quantization loss (평가).",
    cls=o.Group,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EVAL_MODEL = "GGUF file or store name (demo: the bundled demo, the default)."


@app.command("ppl", cls=o.Command)
@o.load_flags(leave_out=("ctx", "draft", "draft_max", "no_prompt_cache"))
def eval_ppl(
    load: dict[str, object],
    model: str | None = typer.Argument(None, help=EVAL_MODEL), text: o.TextFile = ...,
    ctx: o.Window = 512, batch: o.Batch = 2048, json_out: o.Json = False, endpoint: o.EndpointOption = None,
    api_key: o.ApiKey = None, timeout: o.Timeout = None, model_option: o.ModelOption = None,
    concurrency: o.Concurrency = None,
) -> None:
    """Perplexity on a text, computed as llama.cpp's llama-perplexity computes it (same number)."""
    from malhae import nfc, ui
    from malhae.eval import perplexity as ppl
    from malhae.eval import views
    from malhae.runtime.llama import init
    from malhae.runtime.windows import Layout, read_text
    from malhae.store import models

    model = _one_model(model, model_option)
    # a wrong --text is the likelier mistake: say so before anything else; measured as given, even if not NFC
    nfc.warn_as_given(read_text(text), f"--text {text}", ui.note)
    options, _ = o.settings_for("eval", **load)
    remote = o.endpoint_for(endpoint, api_key, timeout, notify=ui.note, flags=load)
    if remote is not None:
        from malhae.eval import remote as scoring
        from malhae.runtime.remote import RemoteBackend

        backend = RemoteBackend(remote, model, notify=ui.note)
        with views.WindowProgress("perplexity", "ppl {:.3f}") as progress:
            result = scoring.perplexity(backend, text, n_ctx=ctx, progress=progress.update,
                                        concurrency=_concurrency(concurrency))
        views.ppl_result(result, json_out)
        return
    _local_only(concurrency)
    init(o.verbose())
    layout = Layout.of(ctx, batch)
    options = replace(options, model=models.resolve(model, ui.note))
    with views.WindowProgress("perplexity", "ppl {:.3f}") as progress:
        result = ppl.run(options, text, layout, progress=progress.update, notify=ui.note)
    views.ppl_result(result, json_out)


def _concurrency(value: int | None) -> int:
    from malhae.eval.remote import DEFAULT_CONCURRENCY, check_concurrency

    return DEFAULT_CONCURRENCY if value is None else check_concurrency(value)


def _local_only(concurrency: int | None) -> None:
    if concurrency is not None:
        raise UserError("--concurrency is for a server's model: give --endpoint URL too (a local model scores one "
                        "batch at a time)")


def _one_model(argument: str | None, option: str | None) -> str | None:
    if argument is not None and option is not None and argument != option:
        raise UserError(f"two models given ({argument!r} and --model {option!r}); give one")
    return argument if argument is not None else option


COMPARE_HELP = ("Quantization loss of B against A: mean KL divergence, top-1 agreement, perplexity of each and their "
                "ratio.\n\nWith one model and --kv-cache q8_0 (or q4_0, or --kv-cache-k/-v): what that KV cache costs "
                "against f16 K/V on the same weights, with the same --flash-attn. With two models, --kv-cache applies "
                "to both, and so does --lora (the adapters must fit both).")


@app.command("compare", cls=o.Command, help=COMPARE_HELP)
@o.load_flags(leave_out=("ctx", "draft", "draft_max", "no_prompt_cache"))
def eval_compare(
    load: dict[str, object],
    model_a: str = typer.Argument(..., help="Reference GGUF (e.g. the F16 file) or store name."),
    model_b: str | None = typer.Argument(None, help="GGUF to measure against it (e.g. a quantization); leave it out "
                                         "to measure A's --kv-cache against an f16 cache."),
    text: o.TextFile = ..., ctx: o.Window = 512, batch: o.Batch = 2048, json_out: o.Json = False,
) -> None:
    """Quantization loss of B against A, or of a KV cache type against f16 (COMPARE_HELP)."""
    from malhae import nfc, ui
    from malhae.eval import compare, views
    from malhae.runtime.llama import init
    from malhae.runtime.windows import Layout, read_text
    from malhae.store import models

    # a wrong --text is the likelier mistake: say so before loading two models; measured as given, even if not NFC
    nfc.warn_as_given(read_text(text), f"--text {text}", ui.note)
    options, _ = o.settings_for("eval", **load)
    init(o.verbose())
    layout = Layout.of(ctx, batch)
    path_a = models.resolve(model_a, ui.note)
    path_b = None if model_b is None else models.resolve(model_b, ui.note)
    with views.WindowProgress("comparing", "KL {:.5f}") as progress:
        result = compare.run(path_a, path_b, text, layout, options, progress=progress.update, notify=ui.note)
    views.compare_result(result, json_out)


@app.command("kobest", cls=o.Command)
@o.load_flags(leave_out=("ctx", "draft", "draft_max", "no_prompt_cache"))
def eval_kobest(
    load: dict[str, object],
    model: str | None = typer.Argument(None, help=EVAL_MODEL),
    tasks: str = typer.Option("copa,hellaswag,boolq,sentineg,wic", "--tasks", show_default=False,
                              help="Comma-separated tasks (default: all five, copa,hellaswag,boolq,sentineg,wic)."),
    shots: str = typer.Option("0,5,10,50", "--shots", show_default=False,
                              help="Few-shot counts, comma-separated (default: 0,5,10,50, as in the model card)."),
    data_dir: Path | None = typer.Option(None, "--data", help="Folder with the skt/kobest_v1 files "
                                         "(<task>/train.jsonl, test.jsonl; default: the bundled sample)."),
    hub: bool = typer.Option(False, "--hub", help="Load skt/kobest_v1 from the hub (needs `datasets` and a network)."),
    limit: int | None = typer.Option(None, "--limit", help="Docs per task, for a quick run (default: all)."),
    precise: bool = typer.Option(False, "--precise", help="f32 K/V cache, no flash attention: slower; scores move "
                                 "less with how the choices are batched."),
    json_out: o.Json = False, endpoint: o.EndpointOption = None, api_key: o.ApiKey = None,
    timeout: o.Timeout = None, model_option: o.ModelOption = None, concurrency: o.Concurrency = None,
) -> None:
    """KoBEST macro F1 (COPA, HellaSwag, BoolQ, SentiNeg, WiC) with the prompts of the Polyglot-Ko model card."""
    from malhae import ui
    from malhae.eval.kobest import data, evaluate
    from malhae.eval.kobest import render as kobest_render
    from malhae.eval.kobest.tasks import select
    from malhae.runtime.llama import init
    from malhae.store import models

    try:
        shot_counts = list(dict.fromkeys(int(k) for k in shots.split(",") if k.strip()))
    except ValueError:
        raise UserError(f"--shots {shots!r}: give numbers separated by commas, e.g. 0,5,10,50") from None
    evaluate.check_options(limit, shot_counts)
    chosen = select(tasks)
    src = data.source(data_dir, hub)
    if src.kind == "sample":
        ui.note("no --data given: using the bundled sample (models/data/kobest-sample), written by malhae — "
                "not KoBEST, its scores mean nothing. Pass --data DIR with the skt/kobest_v1 files.")
    options, _ = o.settings_for("eval", **load)
    model = _one_model(model, model_option)
    remote = o.endpoint_for(endpoint, api_key, timeout, notify=ui.note, flags=load | {"precise": precise})
    if remote is not None:
        from malhae.runtime.remote import RemoteBackend

        backend = RemoteBackend(remote, model, notify=ui.note)
        with kobest_render.KobestProgress() as progress:
            report = evaluate.evaluate_remote(backend, src, chosen, shot_counts, limit=limit,
                                              progress=progress.update, concurrency=_concurrency(concurrency),
                                              notify=ui.note)
        kobest_render.table(report, json_out)
        return
    _local_only(concurrency)
    init(o.verbose())
    options = replace(options, model=models.resolve(model, ui.note))
    with kobest_render.KobestProgress() as progress:
        report = evaluate.evaluate(options, src, chosen, shot_counts, limit=limit, precise=precise,
                                   progress=progress.update, notify=ui.note)
    kobest_render.table(report, json_out)


@o.load_flags(leave_out=("ctx", "draft", "draft_max", "no_prompt_cache"))
def bench(
    load: dict[str, object],
    model: o.LocalModelArgument = None,
    llama_bench: Path | None = typer.Option(None, "--llama-bench", help="Also run this llama-bench and compare (with "
                                            "the same threads, layers, devices, K/V types and flash attention)."),
    n_prompt: int = typer.Option(512, "--prompt", "-p", help="Prompt tokens for the prompt-speed test."),
    n_gen: int = typer.Option(128, "--gen", "-n", help="Tokens for the decode-speed test."),
    repetitions: int = typer.Option(3, "--repetitions", "-r"),
    depth: int = typer.Option(0, "--depth", "-d", help="Tokens already in the cache before each test, as "
                              "llama-bench's -d (a long conversation: where the K/V types differ most)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Context size (default: what the test needs; the settings "
                                   "file's ctx is not used here)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Measure prompt and decode tokens/s through malhae's engine (and llama-bench, side by side)."""
    from malhae import ui
    from malhae.eval import bench as benchmod
    from malhae.eval import upstream, views
    from malhae.runtime.engine import Engine
    from malhae.store import models

    if depth < 0:
        raise UserError(f"--depth {depth}: give 0 or more tokens (llama-bench's -d)")
    options, _ = o.settings_for("bench", **load, ctx=ctx or depth + max(n_prompt + 16, 16 + n_gen + 8))
    if llama_bench and options.lora:
        raise UserError("--llama-bench cannot apply LoRA adapters (llama-bench has no --lora), so the two sides "
                        "would measure different work; leave out --lora or --llama-bench (--lora none overrides "
                        "config.toml's lora)")
    path = models.resolve(model, ui.note)
    with Engine(replace(options, model=path), notify=ui.note) as engine:
        pp, tg = benchmod.run_engine(engine, n_prompt, n_gen, repetitions, depth)
        up_pp = up_tg = None
        if llama_bench:
            test = upstream.BenchTest(n_prompt, n_gen, repetitions, depth)
            up_pp, up_tg = upstream.run_llama_bench(llama_bench, engine.options, engine.plan, test)
        result = benchmod.BenchResult(pp, tg, repetitions, up_pp, up_tg)
        views.bench_table(result, engine, n_prompt, n_gen, json_out, depth)
