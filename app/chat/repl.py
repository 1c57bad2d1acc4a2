"""`malhae chat`: an interactive Korean conversation in the terminal, on the same engine as `ask`.

This module reads (app.chat.reader), dispatches the /commands and writes answers (app.chat.writer); what the
conversation keeps and what fits in the context is app.chat.conversation's business.
"""

from __future__ import annotations

import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from malhae import flags, nfc, ui
from malhae.chat import conversation as conv_mod
from malhae.chat import documents
from malhae.chat.conversation import Conversation, Prepared
from malhae.chat.documents import Document
from malhae.chat.lora_command import LoraCommand
from malhae.chat.reader import (
    COMMANDS,
    KEYS,
    QUIT_HINT,
    InputCancelled,
    Reader,
    classify,
    resolve_command,
)
from malhae.chat.writer import AnswerBroken, write_answer
from malhae.errors import UserError
from malhae.runtime import kv, templates
from malhae.runtime.backend import Backend
from malhae.runtime.engine import Stats, check_model_file
from malhae.runtime.settings import SETTABLE, SETTINGS, LoadOptions, parse
from malhae.runtime.settings import draft as draft_setting
from malhae.runtime.step import StopReason


class Terminated(KeyboardInterrupt):
    """SIGTERM: leave the chat (unlike Ctrl-C, which only stops an answer or clears the line)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


OpenEngine = Callable[[LoadOptions], Backend]  # a model as these options say (on the chat's endpoint, if any)
Resolve = Callable[[str | None, Callable[[str], None] | None], Path]  # --model / /model value → file (the store's)


class Chat(LoraCommand):
    """One chat session: reads, runs commands, streams answers; the conversation and the engine outlive mistakes."""

    def __init__(self, conversation: Conversation, engine: Backend, load: LoadOptions, *, open_engine: OpenEngine,
                 resolve: Resolve, reader: Reader, out: TextIO, console: Console, terminal: bool,
                 template_fixed: bool = False) -> None:
        """`load`: how the running model was loaded, as asked (a ctx of None stays the model's own after /model);
        /model, /set ctx and /set draft change it, and every model the session opens is loaded as it says."""
        self.conv = conversation
        self.engine = engine
        self.open_engine = open_engine
        self.resolve = resolve
        self.reader = reader
        self.out = out
        self.console = console
        self.soft = ui.soft_wrap(console)  # wrapped at spaces on a terminal, one line per message elsewhere
        self.terminal = terminal
        self.template_fixed = template_fixed  # chosen by the user: kept when the model changes
        self.last_stats: Stats | None = None
        self.running = True
        self.pending: list[Document] = []  # read with /read, put before the next message
        self.load = load
        self.composed = nfc.Once(self.note)  # typed or piped text not in NFC: said once a session, not per line

    # --- loop ---

    def run(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            self.banner()
            while self.running:
                self.step()
        finally:
            self.engine.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def banner(self) -> None:
        e = self.engine
        self.dim(f"malhae chat · model {e.name} ({e.where}) · template {self.conv.template.name} · "
                 f"context {e.n_ctx} tokens")
        self.dim("/help for commands (도움말) · Ctrl-C stops an answer · Ctrl-D or /exit quits (종료)")

    def step(self) -> None:
        """One input and what it asks for; every user mistake ends here as one line, and the session goes on."""
        try:
            raw = self.reader.read()
        except EOFError:
            self.running = False
            return
        except InputCancelled:
            return
        except Terminated:
            raise
        except KeyboardInterrupt:
            self.hint(f"Ctrl-C stops an answer while it is written; {QUIT_HINT}")
            return
        except UserError as e:
            self.hint(str(e))
            return
        try:
            kind, text = classify(raw)
            if kind == "command":
                self.command(text)
            elif kind == "message":
                self.say(text)
        except UserError as e:
            self.hint(str(e))
        except Terminated:
            raise
        except KeyboardInterrupt:
            self.hint("interrupted (중단됨)")
        except Exception as e:  # a bug: say so, and keep the conversation (it can still be saved)
            if flags.DEBUG:
                traceback.print_exc()
            self.hint(f"internal error ({type(e).__name__}: {e}); the conversation is kept (/save it); run with "
                      "--debug for the traceback and report it")
        finally:
            self.conv.abandon()  # between inputs every message has its answer, even after a Ctrl-C at a bad moment

    # --- output ---

    def dim(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=self.soft)

    def hint(self, message: str) -> None:
        self.console.print(f"malhae: {ui.printable(message)}", style="yellow", markup=False, highlight=False,
                           soft_wrap=self.soft)

    def note(self, message: str) -> None:
        self.dim(f"malhae: {message}")

    def info(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=self.soft)

    # --- answers ---

    def say(self, message: str) -> None:
        """Answer a message, with the documents /read holds in front of it; they are used up once the message has
        its answer (a refusal, or a failure before anything was shown, keeps them for the next try)."""
        message = nfc.compose(message, "your message (every one is composed; said once)", self.composed)
        if not self.pending:
            self.write(self.conv.ask(message, self.engine.tokenize, self.engine.n_ctx))
            return
        try:
            prepared = self.conv.ask(documents.join(self.pending, message), self.engine.tokenize, self.engine.n_ctx)
        except UserError as e:
            raise UserError(f"{e} (it holds the documents from /read: "
                            f"{documents.sizes(self.pending, self.engine.tokenize)}; /read clear drops them)") from None
        asked = len(self.conv.turns)
        try:
            self.write(prepared)
        finally:
            if len(self.conv.turns) > asked:  # the answer was kept, and with it the message and its documents
                self.pending.clear()

    def write(self, prepared: Prepared) -> None:
        if prepared.dropped:
            self.hint(f"the conversation no longer fits in the context of {self.engine.n_ctx} tokens: forgot the "
                      f"{prepared.dropped} oldest messages (오래된 대화 {prepared.dropped}개를 잊었습니다); "
                      "/set ctx N keeps more")
        engine = self.engine
        before = engine.stats
        pieces = engine.generate(prepared.tokens, self.conv.answer_sampling(), messages=self.conv.messages())
        broken = None
        try:
            text, interrupted = write_answer(pieces, self.out, terminal=self.terminal)
        except AnswerBroken as e:  # cut off after part was shown: keep that part, as after Ctrl-C, then say why
            text, interrupted, broken = e.text, True, e
        except BaseException:
            self.conv.abandon()
            raise
        stats = engine.stats if engine.stats is not before else Stats(prompt_tokens=len(prepared.tokens))
        if interrupted:
            stats.stop_reason = StopReason.INTERRUPTED
        self.conv.answer(text.rstrip())
        self.last_stats = stats
        self.status(stats)
        if broken is not None:
            raise UserError(f"{broken}; what was shown is kept (/retry asks again)")

    def status(self, s: Stats) -> None:
        parts = [f"{s.generated_tokens} tokens", f"{s.decode_tps:.1f} tok/s",
                 f"context {s.prompt_tokens + s.generated_tokens}/{self.engine.n_ctx}"]
        if s.restored_tokens:
            parts.insert(0, f"{s.restored_tokens:,} prompt tokens from cache, {s.restore_seconds:.2f} s")
        if s.stop_reason == StopReason.INTERRUPTED:
            parts.append("interrupted (중단됨)")
        elif s.stop_reason == StopReason.LENGTH:
            parts.append(f"stopped at max_tokens {self.conv.sampling.max_tokens} (/set max_tokens N for longer)")
        elif s.stop_reason == StopReason.CONTEXT:
            parts.append("context full (문맥이 가득 찼습니다)")
        self.dim(" · ".join(parts))
        self.console.print()

    # --- commands ---

    def command(self, text: str) -> None:
        name, arg = (text.split(None, 1) + [""])[:2]  # the argument may span lines (a backslash continuation)
        getattr(self, "cmd_" + resolve_command(name)[1:])(arg.strip())

    def cmd_help(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold" if self.console.color_system else None, no_wrap=True)
        table.add_column()
        for name, (args, summary) in COMMANDS.items():
            table.add_row(escape(f"{name} {args}".strip()), escape(summary))
        self.console.print(table)
        self.dim(KEYS)

    def cmd_exit(self, arg: str) -> None:
        self.running = False

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        self.info("conversation cleared (대화를 지웠습니다)")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            origin = "the template's" if self.conv.system is None else "yours"
            shown = self.conv.system_text or "(none)"
            self.info(f"system text ({origin}): {shown}")
            return
        self.conv.system = None if arg == "default" else nfc.compose(arg, "the system text", self.composed)
        what = "the template's own" if arg == "default" else "set"
        self.info(f"system text {what}; it applies from the next answer")

    def cmd_template(self, arg: str) -> None:
        if not arg:
            for t in templates.all_templates().values():
                mark = "*" if t.name == self.conv.template.name else " "
                self.info(f"{mark} {t.name:<9} {t.description}")
            self.dim("switch with /template NAME")
            return
        self.conv.template = templates.get(arg)
        self.template_fixed = True
        self.info(f"template {arg}: {self.conv.template.description}")

    def cmd_set(self, arg: str) -> None:
        key, _, raw = arg.partition(" ")
        key = key.lower().replace("-", "_")  # /set top-p 0.9 as the command-line option is spelled
        if not key:
            self.info(self._settings_line())
            self.dim("change one with /set KEY VALUE, e.g. /set temperature 0.2")
            return
        if key in ("draft", "draft_max"):
            self._set_draft(key, raw)
            return
        if key not in SETTABLE:
            raise UserError(f"unknown setting {key!r}; the settings are: {', '.join(SETTABLE)}, draft, draft_max")
        if not raw.strip():
            raise UserError(f"give a value: /set {key} {SETTINGS[key].example}")
        value = parse(key, raw, f"/set {key}")
        if key == "ctx" and self.engine.remote:
            raise UserError(f"the context is the server's ({self.engine.n_ctx} tokens); it cannot be changed from "
                            "here")
        if key == "ctx":
            self._reopen(replace(self.load, ctx=value))
            self.conv.ctx = value
            self.info(f"context is now {self.engine.n_ctx} tokens (the model was loaded again)")
            return
        setattr(self.conv.sampling, key, value)
        self.info(f"{key} = {'random' if value is None else _number(value)}")

    def _set_draft(self, key: str, raw: str) -> None:
        """/set draft off|lookup|MODEL and /set draft_max N: speculative decoding from the next answer on."""
        if self.engine.remote:
            raise UserError(f"speculative decoding is the server's to choose ({self.engine.where}); /set {key} is "
                            "for a local model")
        if key == "draft_max":
            if not raw.strip():
                raise UserError(f"give a value: /set draft_max {SETTINGS['draft_max'].example}")
            load = replace(self.load, draft_max=parse("draft_max", raw, "/set draft_max"))
            self.engine.set_draft(load)
            self.load = load
            self.info(f"draft_max = {load.draft_max}")
            return
        value = draft_setting(raw, lambda word: self.resolve(word, None), "/set draft")
        load = replace(self.load, draft=value)
        with self.console.status("loading the draft model…" if isinstance(value, Path) else "…"):
            self.engine.set_draft(load)
        self.load = load
        self.info(f"draft = {self.engine.draft}" + (" (speculative decoding off)" if value == "off" else ""))

    def cmd_show(self, arg: str) -> None:
        e, c = self.engine, self.conv
        system = c.system_text.replace("\n", " ") or "(none)"
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column()
        used, kv_cache = c.context_used(e.tokenize), "" if e.remote else f"; KV cache {kv.summary(e.ctx)}"
        for label, value in (("model", f"{e.name} — {e.location}{self.adapters_shown()}"),
                             ("template", f"{c.template.name} — {c.template.description}"),
                             ("system", f"{system} ({'the template' if c.system is None else 'yours'})"),
                             ("settings", self._settings_line()),
                             ("context", f"{used}/{e.n_ctx} tokens used, {c.exchanges} exchanges{kv_cache}")):
            table.add_row(label, escape(value))
        self.console.print(table)

    def _settings_line(self) -> str:
        s = self.conv.sampling
        values = {key: getattr(s, key) for key in SETTABLE if key != "ctx"}
        values["seed"] = "random" if s.seed is None else s.seed
        values["ctx"] = self.engine.n_ctx
        if not self.engine.remote:
            values["draft"] = f"{self.engine.draft} (max {self.load.draft_max})" if self.engine.draft != "off" \
                else "off"
        if s.grammar is not None:  # chat --schema / --grammar
            values["answers"] = f"held to {s.grammar.source} ({s.grammar.what})"
        return " · ".join(f"{k} {_number(v)}" for k, v in values.items())

    def cmd_retry(self, arg: str) -> None:
        self.write(self.conv.retry(self.engine.tokenize, self.engine.n_ctx))

    def cmd_undo(self, arg: str) -> None:
        _, message = self.conv.undo()
        short = message.replace("\n", " ")
        short = short if len(short) <= 40 else short[:39] + "…"
        self.info(f"took back: {short} (되돌렸습니다)")

    def cmd_save(self, arg: str) -> None:
        words = arg.split()
        force = bool(words) and words[-1] in ("--force", "-f")
        arg = arg[:arg.rindex(words[-1])].strip() if force else arg
        if not arg:
            raise UserError("give a file name: /save chat.json (add --force to replace an earlier save)")
        path = conv_mod.save(self.conv, Path(arg), self.engine.name, force=force, adapters=self.adapter_names())
        self.info(f"saved {self.conv.exchanges} exchanges to {path} (저장했습니다)")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserError("give a file saved with /save: /load chat.json")
        loaded, model = conv_mod.load(Path(arg), self.conv.template)
        loaded.ctx = self.conv.ctx  # the context size belongs to the running engine, not to the file
        self.conv = loaded
        self.template_fixed = True
        self.info(f"loaded {loaded.exchanges} exchanges from {arg} (template {loaded.template.name}) (불러왔습니다)")
        self.saved_with(model, loaded.adapters)

    def cmd_read(self, arg: str) -> None:
        """/read FILE: a document for the next message, refused at once if it could never fit in the context with
        the other pending ones; /read lists them, /read clear drops them."""
        tokenize = self.engine.tokenize
        if not arg:
            if not self.pending:
                self.info("no documents waiting; /read FILE puts one before your next message")
                return
            self.info(f"before your next message: {documents.sizes(self.pending, tokenize)}")
            self.dim("/read clear drops them")
            return
        if arg == "clear":
            n, self.pending = len(self.pending), []
            self.info(f"dropped {n} document{'s' if n != 1 else ''} (문서를 지웠습니다)")
            return
        doc = documents.read_document(arg, self.note)
        tokens = len(tokenize(doc.text))
        room = self.conv.room(documents.join([*self.pending, doc], None), tokenize, self.engine.n_ctx)
        if not room.fits:
            others = f" with the {len(self.pending)} read before it" if self.pending else ""
            raise UserError(f"{arg} is too long for the context (문서가 너무 깁니다): {tokens:,} tokens, "
                            f"{room.alone:,} framed in the conversation{others}, plus {room.reserve} for the answer, "
                            f"but the context holds {room.n_ctx}; /set ctx {room.suggest}, or give a shorter file")
        self.pending.append(doc)
        self.info(f"read {arg}: {tokens:,} tokens; it goes before your next message (문서를 읽었습니다)")

    def cmd_model(self, arg: str) -> None:
        if self.engine.remote:
            self._remote_model(arg)
            return
        if not arg:
            raise UserError("give a model file or a name from `malhae models`: /model path/to/model.gguf")
        self._reopen(self.fitting(replace(self.load, model=self.resolve(arg, None))))
        if not self.template_fixed:
            self.conv.template = templates.for_engine(self.engine)
        self.info(f"model {self.engine.name} ({self.engine.path.name}) · template {self.conv.template.name} · "
                  f"context {self.engine.n_ctx} tokens; the conversation stays")

    def _remote_model(self, arg: str) -> None:
        """/model on an endpoint: the server's models (its /v1/models), or switch to one of them."""
        e = self.engine
        if not arg:
            for m in e.models():
                mark = "*" if m.id == e.name else " "
                self.info(f"{mark} {m.id}" + (f" ({m.n_ctx} tokens)" if m.n_ctx else ""))
            self.dim(f"the models at {e.endpoint.url}; switch with /model NAME")
            return
        e.use(arg)
        if not self.template_fixed:
            self.conv.template = templates.for_engine(e)
        self.info(f"model {e.name} ({e.where}) · template {self.conv.template.name} · context {e.n_ctx} tokens; "
                  "the conversation stays")

    def cmd_stats(self, arg: str) -> None:
        s = self.last_stats
        if s is None:
            raise UserError("no answer yet: send a message first")
        evaluated = s.prompt_tokens - s.cached_tokens
        self.info(f"answer: {s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s, stop: {s.stop_reason or '-'}")
        reused = "by the server" if self.engine.remote else "reused from the last turn"
        if s.restored_tokens:
            reused = f"{s.restored_tokens} from the prompt cache on disk in {s.restore_seconds:.2f} s"
        self.info(f"prompt: {s.prompt_tokens} tokens, {s.cached_tokens} cached ({reused}), "
                  f"{evaluated} evaluated at {s.prompt_tps:.0f} tok/s")
        self.info(f"first token after {s.ttft * 1000:.0f} ms")
        if s.draft_proposed or not self.engine.remote and self.engine.draft != "off":
            share = f" ({100 * s.draft_accepted / s.draft_proposed:.0f}%)" if s.draft_proposed else ""
            self.info(f"drafts ({self.engine.draft}): {s.draft_accepted} of {s.draft_proposed} proposed tokens "
                      f"accepted{share}")
        if self.engine.remote:
            self.dim(f"measured here, over the network; the token counts are the server's ({self.engine.where})")

    def _reopen(self, load: LoadOptions) -> None:
        """Load a model (or the same one with another context); if that fails, the one that worked comes back."""
        check_model_file(load.model)  # the common mistakes, before the running engine is given up
        self.engine.close()
        try:
            with self.console.status(f"loading {load.model.name}…"):
                self.engine = self.open_engine(load)
        except BaseException:
            self.engine = self.open_engine(self.load)
            raise
        self.load = load


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
