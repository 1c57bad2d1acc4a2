"""`malhae complete`, `malhae ask` and `malhae chat`: generation on a local model."""

from __future__ import annotations

from pathlib import Path

import typer

from app.cli import options as o


def _oneshot(kind: str, prompt: str | None, model: str | None, json_out: bool, template: str | None,
             stop: list[str], remote: dict, files: list[Path] | None = None, **flags: object) -> None:
    """`complete` and `ask` share every option; only how the prompt is framed differs."""
    from app import ui
    from app.chat import oneshot, writer
    from app.store import models

    run_opts, sampling = o.settings_for(kind, tuple(stop), **flags)
    endpoint = o.endpoint_for(**remote, local_flags={k: flags[k] for k in o.LOCAL_ONLY}, notify=ui.note)
    given = oneshot.read_prompt(prompt, kind, files or ())
    target = endpoint or models.resolve(model, ui.note)
    draft, draft_max = o.draft_for(flags["draft"], flags["draft_max"], remote=endpoint is not None)
    shot = oneshot.run(kind, given.text, target, sampling, n_ctx=run_opts["ctx"], threads=run_opts["threads"],
                       gpu_layers=run_opts["gpu_layers"], template=template, verbose=o.verbose(), notify=ui.note,
                       model=model if endpoint else None, remote_chat=remote["remote_chat"],
                       documents=given.documents, draft=draft, draft_max=draft_max, device=run_opts["device"])
    if json_out:
        ui.json_result(shot.collect())
    else:
        writer.write_oneshot(shot)


PROMPT_ARG = typer.Argument(None, help="The text; `-` or nothing reads it from a pipe.")
STOP = typer.Option([], "--stop", help="Stop before this text (repeatable).")
FILES = typer.Option([], "--file", help="A UTF-8 text file to put before the text, after piped input "
                     "(repeatable, in order).")


def complete(
    prompt: str | None = PROMPT_ARG, model: o.ModelOption = None, max_tokens: o.OneShotMaxTokens = None,
    temperature: o.Temperature = None, top_p: o.TopP = None, top_k: o.TopK = None, min_p: o.MinP = None,
    repeat_penalty: o.RepeatPenalty = None, repeat_last_n: o.RepeatLastN = None, seed: o.Seed = None,
    frequency_penalty: o.FrequencyPenalty = None, presence_penalty: o.PresencePenalty = None, stop: list[str] = STOP,
    ctx: o.Ctx = None, threads: o.Threads = None, gpu_layers: o.GpuLayers = None, device: o.DeviceOption = None,
    json_out: o.Json = False, endpoint: o.EndpointOption = None, api_key: o.ApiKey = None, timeout: o.Timeout = None,
    files: list[Path] = FILES, draft: o.Draft = None, draft_max: o.DraftMax = None,
) -> None:
    """Continue a text as it is (raw completion, for base models)."""
    remote = {"flag": endpoint, "api_key": api_key, "timeout": timeout, "remote_chat": False}
    _oneshot("complete", prompt, model, json_out, None, stop, remote, max_tokens=max_tokens, temperature=temperature,
             top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
             seed=seed, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, ctx=ctx,
             threads=threads, gpu_layers=gpu_layers, device=device, files=files, draft=draft,
             draft_max=draft_max)


def ask(
    prompt: str | None = PROMPT_ARG, model: o.ModelOption = None, max_tokens: o.OneShotMaxTokens = None,
    temperature: o.Temperature = None, top_p: o.TopP = None, top_k: o.TopK = None, min_p: o.MinP = None,
    repeat_penalty: o.RepeatPenalty = None, repeat_last_n: o.RepeatLastN = None, seed: o.Seed = None,
    frequency_penalty: o.FrequencyPenalty = None, presence_penalty: o.PresencePenalty = None, stop: list[str] = STOP,
    ctx: o.Ctx = None, threads: o.Threads = None, gpu_layers: o.GpuLayers = None, device: o.DeviceOption = None,
    template: o.Template = None, json_out: o.Json = False, endpoint: o.EndpointOption = None,
    api_key: o.ApiKey = None, timeout: o.Timeout = None, remote_chat: o.RemoteChat = False,
    files: list[Path] = FILES, draft: o.Draft = None, draft_max: o.DraftMax = None,
) -> None:
    """Ask one question, framed in the model's prompt format, and print the answer."""
    remote = {"flag": endpoint, "api_key": api_key, "timeout": timeout, "remote_chat": remote_chat}
    _oneshot("ask", prompt, model, json_out, template, stop, remote, max_tokens=max_tokens, temperature=temperature,
             top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
             seed=seed, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, ctx=ctx,
             threads=threads, gpu_layers=gpu_layers, device=device, files=files, draft=draft,
             draft_max=draft_max)


def chat(
    model: o.ModelOption = None, template: o.Template = None,
    system: str | None = typer.Option(None, "--system", help="System text (default: the template's)."),
    ctx: o.Ctx = None, threads: o.Threads = None, gpu_layers: o.GpuLayers = None, device: o.DeviceOption = None,
    temperature: o.Temperature = None,
    top_p: o.TopP = None, top_k: o.TopK = None, min_p: o.MinP = None, repeat_penalty: o.RepeatPenalty = None,
    max_tokens: o.ChatMaxTokens = None,
    seed: int | None = typer.Option(None, "--seed", help="Fix the sampling seed for repeatable answers."),
    no_color: bool = typer.Option(False, "--no-color", help="No colours or styles (also: the NO_COLOR variable)."),
    endpoint: o.EndpointOption = None, api_key: o.ApiKey = None, timeout: o.Timeout = None,
    remote_chat: o.RemoteChat = False, draft: o.Draft = None, draft_max: o.DraftMax = None,
) -> None:
    """Talk with a model (대화): streaming answers, input history, /commands; /help inside for more."""
    from app import ui
    from app.chat import repl
    from app.store import models

    run_opts, sampling = o.settings_for("chat", temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                        repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed, ctx=ctx,
                                        threads=threads, gpu_layers=gpu_layers, device=device)
    remote = o.endpoint_for(endpoint, api_key, timeout, remote_chat=remote_chat, notify=ui.note,
                            local_flags={"threads": threads, "gpu_layers": gpu_layers, "device": device,
                                         "draft": draft, "draft_max": draft_max})
    draft_at, n_draft = o.draft_for(draft, draft_max, remote=remote is not None)
    repl.open_chat(model=model, resolve=models.resolve, template=template, system=system, sampling=sampling,
                   ctx=run_opts["ctx"], threads=run_opts["threads"], gpu_layers=run_opts["gpu_layers"],
                   no_color=no_color, verbose=o.verbose(), endpoint=remote, remote_chat=remote_chat,
                   draft=draft_at, draft_max=n_draft, device=run_opts["device"]).run()
