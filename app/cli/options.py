"""The options several commands share, declared once: the same flag has the same name, help and default everywhere.

Every option the settings file can set defaults to None here, so that `settings_for()` applies flag > config.toml >
built-in (app.store.config) — and the built-in shown in --help is the settings table's (app.runtime.settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from malhae.runtime.settings import DEFAULT_DRAFT, DEFAULT_MAX_CTX, ONESHOT_MAX_TOKENS, SETTINGS

# typer's help shows an option's Python type as its value; these are the words a user reads instead
VALUE_WORDS = {"<str>": "TEXT", "<int>": "INTEGER", "<float>": "NUMBER", "<path>": "PATH", "<list[str]>": "TEXT",
               "<list[Path]>": "FILE"}


def _metavars(params: list, ctx) -> list:
    """What each option's help row shows as its value: typer shows Python types (`--json <bool>`, `--help <bool>`,
    `--stop <list[str]>`), but a flag takes no value (an empty metavar: none is shown), and a value is a word:
    VALUE_WORDS, unless the option names its own with metavar= where it is declared (NAME, DIR, ORIGIN)."""
    for param in params:
        if param.param_type_name == "argument":  # typer reads an argument's value column from its type alone
            shown = param.display_type(ctx)
            param.display_type_rich = lambda ctx, word=VALUE_WORDS.get(shown, shown): word
            continue
        if param.param_type_name != "option" or param.metavar is not None:
            continue
        if param.is_flag:
            param.metavar = ""
        else:
            shown = param.display_type(ctx)
            param.metavar = VALUE_WORDS.get(shown, shown)
    return params


class Command(TyperCommand):
    """Every malhae command (`app.command(cls=Command)`): its --help names values in words and flags bare."""

    def get_params(self, ctx):
        return _metavars(super().get_params(ctx), ctx)


class Group(TyperGroup):
    """Every malhae command group (`typer.Typer(cls=Group)`): as Command, for the group's own options."""

    def get_params(self, ctx):
        return _metavars(super().get_params(ctx), ctx)

LOCAL_MODEL_HELP = ("A name from `malhae models` (demo: the bundled demo) or a .gguf file (default: default_model in "
                    "the settings file, else the demo).")
# only for commands that take --endpoint: a command's help describes the options it has, no others
MODEL_HELP = f"{LOCAL_MODEL_HELP[:-2]}); with --endpoint, the server's model id (default: its only model)."


def _default(name: str) -> str:
    return f"(default: {SETTINGS[name].default})"


ModelOption = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP, metavar="NAME")]
LocalModelOption = Annotated[str | None, typer.Option("--model", "-m", help=LOCAL_MODEL_HELP, metavar="NAME")]
LocalModelArgument = Annotated[str | None, typer.Argument(help=LOCAL_MODEL_HELP)]
Ctx = Annotated[int | None, typer.Option("--ctx", help=f"Context size (default: the model's, at most "
                                                       f"{DEFAULT_MAX_CTX}).")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: physical cores).")]
GpuLayers = Annotated[str | None, typer.Option("--gpu-layers", help="auto, 0 (CPU only) or a number of layers "
                                                                    f"{_default('gpu_layers')}.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="Where to offload: auto (every discrete GPU, else "
                                                "an integrated one the whole model fits on), cpu, or GPUs by name or "
                                                "number as `malhae info` lists them: CUDA1, MTL0, Vulkan0, 1, or "
                                                "CUDA0,CUDA1 to split over those (default: config.toml's device, "
                                                "else auto).")]
KvCache = Annotated[str | None, typer.Option("--kv-cache", help="The KV cache's type for K and V: f16, q8_0 (half "
                                           "the memory) or q4_0 (a quarter); quantized V needs flash attention. On a "
                                           "CPU a smaller cache is slower at long contexts (default: config.toml's "
                                           "kv_cache, else f16).", metavar="TYPE")]
KvCacheK = Annotated[str | None, typer.Option("--kv-cache-k", help="K's type alone (default: as --kv-cache).",
                                              metavar="TYPE")]
KvCacheV = Annotated[str | None, typer.Option("--kv-cache-v", help="V's type alone (default: as --kv-cache).",
                                              metavar="TYPE")]
FlashAttn = Annotated[str | None, typer.Option("--flash-attn", help="Flash attention: auto (as llama.cpp decides "
                                               "for the device), on or off (default: config.toml's flash_attn, else "
                                               "auto).", metavar="WHEN")]
NoPromptCache = Annotated[bool | None, typer.Option("--no-prompt-cache", help="Neither read nor write the prompt "
                                                    "cache: long prompts' evaluated state kept on disk so a document "
                                                    "is read once (default: config.toml's prompt_cache, else on; "
                                                    "`malhae cache` lists and clears it).")]
LoraOption = Annotated[list[str] | None, typer.Option("--lora", metavar="ADAPTER", help="A LoRA adapter applied on "
                      "top of the model: a name from `malhae models` or a .gguf file, with :SCALE to weigh it "
                      "(koalpaca-qlora, style.gguf:0.5; repeat for several; default: config.toml's lora, else "
                      "none; --lora none for none).")]
Template = Annotated[str | None, typer.Option("--template", help="Prompt format: base, koalpaca, kullm (default: the "
                                                                 "GGUF's chat template, else from the model's name).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Schema = Annotated[str | None, typer.Option("--schema", metavar="SCHEMA", help="Answer in JSON that follows this "
                   "schema: inline JSON, a .json file, or fields such as 'name, age int, 요약: 한 문장' (stdout is the "
                   "JSON alone).")]
GrammarOption = Annotated[str | None, typer.Option("--grammar", metavar="GBNF", help="Answer as this GBNF grammar "
                          "allows: a file, or rules inline such as 'root ::= (\"예\" | \"아니요\")'.")]
Temperature = Annotated[float | None, typer.Option("--temperature", help=f"0 = greedy {_default('temperature')}.")]
TopP = Annotated[float | None, typer.Option("--top-p", help=_default("top_p"))]
TopK = Annotated[int | None, typer.Option("--top-k", help=_default("top_k"))]
MinP = Annotated[float | None, typer.Option("--min-p", help=_default("min_p"))]
RepeatPenalty = Annotated[float | None, typer.Option("--repeat-penalty", help=_default("repeat_penalty"))]
FrequencyPenalty = Annotated[float | None, typer.Option("--frequency-penalty", help="-2 to 2, per repetition "
                                                                                  f"{_default('frequency_penalty')}.")]
PresencePenalty = Annotated[float | None, typer.Option("--presence-penalty", help="-2 to 2, once a token has appeared "
                                                                                f"{_default('presence_penalty')}.")]
RepeatLastN = Annotated[int | None, typer.Option("--repeat-last-n", help=_default("repeat_last_n"))]
Seed = Annotated[int | None, typer.Option("--seed", help="Fix the sampling seed for repeatable output.")]
OneShotMaxTokens = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most tokens to generate (default: "
                                                                                 f"{ONESHOT_MAX_TOKENS}).")]
ChatMaxTokens = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most tokens per answer "
                                                                              f"{_default('max_tokens')}.")]
EndpointOption = Annotated[str | None, typer.Option("--endpoint", help="Run on an OpenAI-compatible server instead "
                                                   "of a local model: its base URL, e.g. http://127.0.0.1:8080/v1 "
                                                   "(default: $MALHAE_ENDPOINT, else config.toml's endpoint; `local` "
                                                   "runs locally). --model then names the server's model.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", help="The endpoint's API key (default: $MALHAE_API_KEY, or "
                                                              "the variable config.toml's api_key_env names).")]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for the endpoint before giving up "
                                                                 "(default: 120).")]
RemoteChat = Annotated[bool, typer.Option("--remote-chat", help="With --endpoint: send messages to "
                                                                "/v1/chat/completions, framed by the server's own "
                                                                "template (default: malhae's template, raw prompt).")]
Concurrency = Annotated[int | None, typer.Option("--concurrency", help="With --endpoint: requests in flight at "
                                                                       "once, which the server batches (default: "
                                                                       "4).")]
Draft = Annotated[str | None, typer.Option("--draft", help="Speculative decoding (same output, faster where the "
                                         "answer repeats its input): off, lookup (n-grams of the prompt and "
                                         "answer) or a draft model of the same tokenizer, a name from `malhae "
                                         "models` or a .gguf file (default: config.toml's draft, else "
                                         f"{DEFAULT_DRAFT}).")]
DraftMax = Annotated[int | None, typer.Option("--draft-max", help="Most drafted tokens verified at once; fewer are "
                                              "drafted where that pays better "
                                              f"{_default('draft_max')}.")]
TextFile = Annotated[Path, typer.Option("--text", help="UTF-8 text file to score (e.g. a held-out corpus).")]
Window = Annotated[int, typer.Option("--ctx", help="Tokens per window; the second half of each is scored.")]
Batch = Annotated[int, typer.Option("--batch", help="Tokens per decode; batch/ctx windows go together.")]


# decided by the server when an endpoint runs the model: given with --endpoint, they are said to be ignored
LOCAL_ONLY = ("threads", "gpu_layers", "device", "draft", "draft_max", "precise", "kv_cache", "kv_cache_k",
              "kv_cache_v", "flash_attn", "no_prompt_cache", "lora")


# every flag that says how a local model is loaded, declared once: a command takes them all through @load_flags
# (less those it leaves out), so that a new load setting is one line here, not one parameter per command
LOAD_FLAGS = {"ctx": Ctx, "threads": Threads, "gpu_layers": GpuLayers, "device": DeviceOption, "draft": Draft,
              "draft_max": DraftMax, "kv_cache": KvCache, "kv_cache_k": KvCacheK, "kv_cache_v": KvCacheV,
              "flash_attn": FlashAttn, "no_prompt_cache": NoPromptCache, "lora": LoraOption}


def load_flags(*, leave_out: tuple[str, ...] = ()):
    """Decorate a Typer command so that it also takes LOAD_FLAGS' options (less `leave_out`); the command gets
    them as one dict, its keyword `load` (None: not given), to hand to settings_for."""
    import functools
    import inspect

    def decorate(command):
        own = inspect.signature(command, eval_str=True)  # Typer reads the Annotated options from the signature
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=LOAD_FLAGS[name])
                 for name in LOAD_FLAGS if name not in leave_out]
        names = [p.name for p in added]

        @functools.wraps(command)
        def with_load_flags(**options: object):
            return command(load={name: options.pop(name) for name in names}, **options)

        kept = [p for p in own.parameters.values() if p.name != "load"]
        with_load_flags.__signature__ = own.replace(parameters=[*kept, *added])
        return with_load_flags

    return decorate


def settings_for(command: str, stop: tuple[str, ...] = (), *, remote: bool = False, model: Path | None = None,
                 **flags: object):
    """(LoadOptions, Sampling) for a command: each flag given, else config.toml's, else the built-in.

    `flags` holds the command's own options by setting name (None: not given). Only the load settings a command
    has are taken from config.toml (bench has no draft: it never speculates; eval's --ctx is a window, always
    given); a command without sampling options (bench, eval, info) just ignores the Sampling. A draft model is
    found the way --model is (the store); with an endpoint (`remote`) the server decodes as it does: no draft."""
    import dataclasses

    from malhae.runtime.settings import SAMPLING_KEYS, LoadOptions, Sampling, check, kv_fields
    from malhae.store import config

    file = config.load()
    if model is not None:  # the model's own settings (`malhae models set`) over config.toml's, under the flags
        from malhae.store import model_settings

        file = model_settings.over(file, model_settings.for_path(model))
    run = config.runtime_values({k: flags.get(k) for k in config.RUN_KEYS}, file)
    load = kv_fields({k: v for k, v in run.items() if k in flags})  # kv_cache: one type for both
    if "draft" in flags and not remote:
        load |= _draft(flags["draft"], flags.get("draft_max"), file)
    if "no_prompt_cache" in flags and not remote:
        load |= _prompt_cache(False if flags["no_prompt_cache"] else None, file)
    if "lora" in flags and not remote:
        load["lora"] = loras(flags["lora"], file)
    fields = {f.name for f in dataclasses.fields(LoadOptions)}  # the rest as given (parallel, batch, …)
    load |= {k: check(k, v) if k in SETTINGS else v for k, v in flags.items()
             if k in fields and k not in load and k not in ("draft", "draft_max", "lora") and v is not None}
    values = config.sampling_values(command, {k: v for k, v in flags.items() if k in SAMPLING_KEYS}, file)
    return LoadOptions(**load, verbose=verbose()), Sampling(**values, stop=stop).checked()


def _draft(flag: object, draft_max: object, file) -> dict[str, object]:
    """draft and draft_max: --draft > config.toml's draft > DEFAULT_DRAFT; --draft-max > config.toml's > the
    settings table's (LoadOptions' own default: given only when the flag or the file says it)."""
    from malhae import ui
    from malhae.runtime import settings
    from malhae.store import config, models

    if draft_max is not None:
        settings.check("draft_max", draft_max)
    raw = flag if flag is not None else file.draft or DEFAULT_DRAFT
    usage = "--draft" if flag is not None else f"{file.path}: draft"
    out = {"draft": settings.draft(raw, lambda word: models.resolve(word, ui.note), usage)}
    n = config.pick(draft_max, file.draft_max, None)
    return out | ({"draft_max": n} if n is not None else {})


def keep_alive(flag: str | None) -> float | None:
    """--keep-alive > config.toml's keep_alive > Ollama's 5 minutes (seconds; None: for ever)."""
    from malhae import units
    from malhae.store import config

    if flag is not None:
        return units.duration(flag, "--keep-alive")
    file = config.load()
    if file.keep_alive is not None:
        return units.duration(file.keep_alive, f"{file.path}: keep_alive")
    return 300.0


def loras(given: list[str] | None, file=None) -> tuple:
    """--lora (repeatable) > config.toml's lora > none; `--lora none` (or off) applies none whatever the file says.
    Names are found the way --model is (the store)."""
    from malhae import ui
    from malhae.runtime import lora
    from malhae.store import config, models

    if given:
        values, usage = ([] if [g.strip().lower() for g in given] in (["none"], ["off"]) else given), "--lora"
    else:
        file = file or config.load()
        values, usage = file.lora or [], f"{file.path}: lora"
    return tuple(lora.parse(v, lambda word: models.resolve(word, ui.note), usage) for v in values)


def _prompt_cache(flag: bool | None, file) -> dict[str, object]:
    """prompt_cache (the folder, or None when off) and its cap: --no-prompt-cache > config.toml > on."""
    from malhae import files
    from malhae.store import config

    on = config.pick(flag, file.prompt_cache, True)
    cap = config.pick(None, file.prompt_cache_max, SETTINGS["prompt_cache_max"].default)
    return {"prompt_cache": files.cache_dir() / "prompt-cache" if on else None, "prompt_cache_max": cap}


def verbose() -> bool:
    from malhae import flags

    return flags.VERBOSE


def endpoint_for(flag: str | None, api_key: str | None = None, timeout: float | None = None, *,
                 remote_chat: bool = False, flags: dict[str, object] | None = None, notify=None):
    """The Endpoint to run on (flag > $MALHAE_ENDPOINT > config.toml's endpoint; `local` or none: None, a local
    model). The key: --api-key, else the environment variable config.toml's api_key_env names (MALHAE_API_KEY).
    `flags`: the command's options by name; those in LOCAL_ONLY that were given are said to be ignored."""
    import os

    from malhae.errors import UserError
    from malhae.runtime.endpoint import Endpoint
    from malhae.store import config

    file = config.load()
    url = flag if flag is not None else os.environ.get("MALHAE_ENDPOINT") or file.endpoint
    if not url or url.strip().lower() == "local":
        for given, name in ((api_key, "--api-key"), (timeout, "--timeout"), (remote_chat or None, "--remote-chat")):
            if given is not None:
                raise UserError(f"{name} is for a remote model: give --endpoint URL too (or MALHAE_ENDPOINT)")
        return None
    variable = file.api_key_env or "MALHAE_API_KEY"
    key = api_key if api_key is not None else os.environ.get(variable) or None
    endpoint = Endpoint.parse(url, key, timeout if timeout is not None else file.endpoint_timeout)
    given = flags or {}
    ignored = [f"--{k.replace('_', '-')}" for k in LOCAL_ONLY if given.get(k) not in (None, False)]
    if ignored and notify:
        verb = "apply" if len(ignored) > 1 else "applies"
        notify(f"{' and '.join(ignored)} {verb} to a local model; the server at {endpoint.url} decides its own")
    return endpoint
