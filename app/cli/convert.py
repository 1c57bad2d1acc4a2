"""`malhae convert` and `malhae pull`: a Hugging Face checkpoint (local, or from the hub) into a GGUF."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from malhae.cli import options as o
from malhae.errors import UserError

MERGE_HELP = ("A PEFT LoRA adapter folder to merge into the weights before quantizing, with :SCALE to weigh it "
              "(repeatable; merged in order). Also takes what --lora cannot: DoRA, trained biases, saved modules.")
THREADS_HELP = "Threads for quantizing (default: the settings file's threads, else all cores)."
IMATRIX_HELP = ("Importance matrix for the quantizer: auto (computed on malhae's Korean calibration text) or a file "
                "from `malhae imatrix` or llama-imatrix. Needed by iq1_*, iq2_*, iq3_xxs, iq3_xs, q2_k_s; "
                "better at every low-bit type.")


def convert(
    src: Path | None = typer.Argument(None, help="Hugging Face model directory (config.json, tokenizer.json, "
                                      "weights)."),
    type_name: str = typer.Option("f16", "--type", "-t", help="Output type: f32, f16, bf16, q8_0, q6_k, q5_k_m, "
                                  "q4_k_m, q4_0, q3_k_m, q2_k, iq4_nl, … (see `malhae convert --list-types`)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: ./<model>-<type>.gguf)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits with transformers afterwards."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    list_types: bool = typer.Option(False, "--list-types", help="List the output types and exit."),
    name: str | None = typer.Option(None, "--name", help="The model's name in the GGUF (default: the folder's, "
                                    "or the hub id's)."),
    template: str | None = typer.Option(None, "--template", help="Prompt format written as the GGUF's chat "
                                        "template: base, koalpaca, kullm (default: from the catalog or the model's "
                                        "name or hub id; none when unknown)."),
    add: bool = typer.Option(False, "--add", help="Add the result to the model store (without -o, write it "
                             "there directly) as --name, else <model>-<type>."),
    imatrix: str | None = typer.Option(None, "--imatrix", help=IMATRIX_HELP),
    merge_lora: list[str] | None = typer.Option(None, "--merge-lora", metavar="ADAPTER", help=MERGE_HELP),
    base: str | None = typer.Option(None, "--base", metavar="MODEL", help="For a PEFT adapter folder: the model it "
                                    "adapts (its Hugging Face folder, a .gguf or a store name; default: the one its "
                                    "adapter_config.json names, found here or in the store)."),
) -> None:
    """Convert a Polyglot-Ko (GPT-NeoX) checkpoint into a GGUF file, proven to tokenize like the original; or a PEFT
    LoRA adapter folder into an adapter GGUF for --lora."""
    from malhae.convert import pipeline
    from malhae.convert import types as out_types
    from malhae.runtime.interrupts import Interrupts
    from malhae.runtime.llama import init
    from malhae.store import catalog, convert_view

    if list_types:
        convert_view.types_table(out_types.TYPES)
        return
    if src is None:
        raise UserError("give the model directory: malhae convert ./polyglot-ko-1.3b --type q4_k_m")
    from malhae.convert import lora

    if lora.is_adapter(src):
        for given, flag in ((imatrix, "--imatrix"), (template, "--template"), (merge_lora, "--merge-lora")):
            if given:
                raise UserError(f"{flag} is for converting a model; {src} is a LoRA adapter (to merge it: malhae "
                                f"convert BASE_FOLDER --merge-lora {src})")
        _adapter(src, base, type_name, output, force, name, add, verify, threads)
        return
    if base is not None:
        raise UserError(f"--base is for converting a LoRA adapter folder; {src} is a model (no adapter_config.json)")
    merges = _merges(merge_lora)
    # an unknown --type, or one that needs an imatrix and has none, are the cheapest mistakes to report
    imatrix = pipeline.check_imatrix_option(out_types.get(type_name), imatrix)
    threads = o.settings_for("convert", threads=threads)[0].threads
    target = None
    if add:  # a taken store name is refused now, not after minutes of converting
        from malhae.store.local import open_store

        stem = "+".join([pipeline.model_name(src), *(m.folder.resolve().name for m in merges)])
        target = open_store().conversion_target(name or f"{stem}-{out_types.get(type_name).name}",
                                                output, force)
        output = target.output
    template = template or catalog.template_for_checkpoint(src, name)
    # Ctrl-C is a flag while llama.cpp works (pipeline.convert); held through the summary, so that one arriving
    # once the file is in place is dropped (exit 0, the file complete) instead of exiting 130 with a file made
    with Interrupts():
        init(o.verbose())
        with convert_view.ConvertProgress() as progress:
            result = pipeline.convert(src, type_name, output, force=force, threads=threads, progress=progress.update,
                                      name=name, template=template, imatrix=imatrix, merge=merges)
        convert_view.convert_summary(result)
    if target is not None:
        from malhae.store import models_view

        with models_view.CopyProgress(f"adding {result.path.name} to the store", result.size) as copying:
            entry = target.finish(result.path, progress=copying.update)
        convert_view.added(entry)
    if verify:
        from malhae.convert.verify import verify as run_verify

        report = run_verify(src, result.path, result.type, threads=threads, merge=merges)
        convert_view.verify_table(report)
        if report.passed is False:
            raise UserError(f"verification failed: {report.criterion} does not hold (the table above shows where)",
                            exit_code=1)


def _merges(values: list[str] | None) -> list:
    from malhae.convert import merge

    return [merge.parse(v) for v in values or ()]


def _adapter(src: Path, base: str | None, type_name: str, output: Path | None, force: bool, name: str | None,
             add: bool, verify: bool, threads: int | None) -> None:
    """`malhae convert ADAPTER_FOLDER`: the PEFT adapter as llama.cpp's adapter GGUF (f16 unless --type f32);
    --verify runs it on its base through llama.cpp against PEFT on the base's checkpoint."""
    import time

    from malhae import ui
    from malhae.convert import lora, lora_gguf
    from malhae.store import convert_view, lora_base

    start = time.perf_counter()
    type_name = type_name.lower()
    if type_name not in lora_gguf.TYPES:
        raise UserError(f"--type {type_name}: a LoRA adapter is written as f16 (the default) or f32")
    adapter = lora.read(src)
    found = lora_base.find_base(base, adapter, ui.note)
    lora_gguf.check_fits(adapter, found)  # another model's adapter: refused before a note says it fits
    note = lora_gguf.trained_elsewhere(adapter, found)
    if note:
        ui.note(note)
    from malhae.convert import verify as check

    reference = check.adapter_reference(found, adapter) if verify else None  # a missing reference: said now
    stem = name or adapter.name
    target = None
    if add:
        from malhae.store.local import open_store

        target = open_store().conversion_target(stem, output, force)
        output = target.output
    out = (output or Path.cwd() / f"{stem}.gguf").absolute()
    written = lora_gguf.write(adapter, found, out, type_name=type_name, force=force, name=stem)
    convert_view.adapter_summary(written, time.perf_counter() - start)
    if target is not None:
        convert_view.added(target.finish(written.path))
    if reference is not None:
        threads = o.settings_for("convert", threads=threads)[0].threads
        report = check.verify_written(found, adapter, written.path, reference, threads)
        convert_view.verify_table(report)
        if report.passed is False:
            raise UserError(f"verification failed: {report.criterion} does not hold (the table above shows where)",
                            exit_code=1)


def pull(
    model: str = typer.Argument(..., help="A catalog name (see `malhae models catalog`) or a hub id "
                                "(org/name)."),
    type_name: str = typer.Option("q4_k_m", "--type", "-t", help="Output type (see `malhae convert --list-types`)."),
    name: str | None = typer.Option(None, "--name", help="Name in the store (default: <model>-<type>)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace a model of the same name in the store."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit on the hub (default: main)."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    imatrix: str | None = typer.Option(None, "--imatrix", help=IMATRIX_HELP),
    merge_lora: list[str] | None = typer.Option(None, "--merge-lora", metavar="ADAPTER", help=MERGE_HELP),
) -> None:
    """Download a checkpoint from the Hugging Face hub, convert it and add it to the store (받기)."""
    from malhae.runtime.llama import init
    from malhae.store import catalog_view, convert_view
    from malhae.store import pull as pull_mod

    threads = o.settings_for("pull", threads=threads)[0].threads
    init(o.verbose())
    with convert_view.ConvertProgress() as progress:
        pulled = pull_mod.pull(model, type_name, name=name, force=force, revision=revision, threads=threads,
                               progress=progress.update, before_convert=catalog_view.pull_starting,
                               imatrix=imatrix, merge=_merges(merge_lora))
    convert_view.convert_summary(pulled.result)
    catalog_view.pulled(pulled)


@o.load_flags(leave_out=("ctx", "draft", "draft_max", "no_prompt_cache"))
def imatrix(
    load: dict[str, object],
    model: str | None = typer.Argument(None, help="GGUF file (F16, BF16 or F32 is best) or store name."),
    text: Path | None = typer.Option(None, "--text", help="UTF-8 calibration text (default: malhae's Korean "
                                     "corpus: the constitution, bills and dialogues; never the held-out bills)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: "
                                       "./<model>.imatrix.gguf)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output file if it exists."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (llama-imatrix's --ctx-size)."),
    chunks: int | None = typer.Option(None, "--chunks", help="Use at most this many chunks (default: all the "
                                      "text)."),
    batch: o.Batch = 2048,
    process_output: bool = typer.Option(False, "--process-output", help="Also collect for output.weight (as "
                                        "llama-imatrix --process-output)."),
) -> None:
    """Compute an importance matrix for quantizing with --imatrix, in llama-imatrix's GGUF format (중요도 행렬)."""
    from malhae import ui
    from malhae.convert import importance
    from malhae.eval import views
    from malhae.runtime.llama import init
    from malhae.runtime.windows import read_text
    from malhae.store import convert_view, models

    if model is None:
        raise UserError("give the model: malhae imatrix polyglot-ko-5.8b-f16.gguf (the F16 you will quantize)")
    if text is not None:
        read_text(text)  # a wrong --text is the likelier mistake: say so before anything else
    options, _ = o.settings_for("eval", **load)
    init(o.verbose())
    path = models.resolve(model, ui.note)
    out = (output or Path.cwd() / f"{path.name.removesuffix('.gguf')}.imatrix.gguf").absolute()
    with views.WindowProgress("importance matrix", "ppl {:.3f}") as progress:
        result = importance.run(replace(options, model=path), out, text_path=text, force=force,
                                layout=importance.chunk_layout(ctx, batch), chunks=chunks, output=process_output,
                                progress=progress.update, notify=ui.note)
    convert_view.imatrix_summary(result)
