"""A chat conversation without a terminal: turns, system text, template, settings, and what fits in the context.

Kept apart from the REPL so that the rules that decide what the model sees (prompt text, which turns are dropped when
the context is full, what a saved file must contain) can be tested without a terminal or a model. The engine reuses
its KV cache for every token a new prompt shares with the previous one, so the prompt for each answer is built to
start with the previous prompt and answer: the conversation is only ever appended to, except when the user rewrites
it (/undo, /retry, /system, /template) or when the oldest turns have to go.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from malhae import files
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.settings import SETTABLE, Sampling, check
from malhae.runtime.templates import Template

FORMAT = "malhae-chat"
VERSION = 1
Tokenize = Callable[[str], list[int]]
Turn = tuple[str, str]  # (role, text); role "user" or "assistant"; user and assistant alternate, user first


# --- the conversation -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """The prompt for the next answer, as tokens, and how many old messages had to be dropped to make room."""

    tokens: list[int]
    dropped: int = 0


@dataclass(frozen=True)
class Room:
    """What a message needs at the least: the prompt with it as the only turn (system text and template frame
    included), plus the answer's reserve. Old turns can be dropped to make room; this cannot, so a message (or a
    document read for the next one) over it is refused before anything is evaluated."""

    alone: int  # tokens of the prompt holding only this message
    reserve: int  # tokens kept for the answer
    n_ctx: int

    @property
    def fits(self) -> bool:
        return self.alone + self.reserve <= self.n_ctx

    @property
    def suggest(self) -> int:
        """A context that would take it: the next power of two, as /set ctx values usually are."""
        return 1 << max(self.alone + self.reserve - 1, 1).bit_length()


@dataclass
class Conversation:
    template: Template
    sampling: Sampling = field(default_factory=Sampling)
    ctx: int | None = None  # None: the model's default context size
    system: str | None = None  # None: the template's own system text
    turns: list[Turn] = field(default_factory=list)
    # the LoRA adapters a loaded file was saved with ("name", "name:0.5"): said on /load, never applied by it (they
    # belong to a model, as the context size does)
    adapters: tuple[str, ...] = ()

    # --- what the model sees ---

    @property
    def system_text(self) -> str:
        return self.template.system if self.system is None else self.system

    def prompt(self, turns: list[Turn] | None = None) -> str:
        return self.template.prompt(self.turns if turns is None else turns, self.system_text)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages (OpenAI's shape), for a server that applies its own template."""
        system = [{"role": "system", "content": self.system_text}] if self.system_text else []
        return system + [{"role": role, "content": text} for role, text in self.turns]

    def answer_sampling(self) -> Sampling:
        """The settings plus the template's stop strings, which keep a base model from writing the user's turn, for
        an answer (shown and kept from its first non-space character; Template.prompt puts the space back). An
        answer held to a grammar ends where the grammar does (Template.stops)."""
        return replace(self.sampling, stop=self.template.stops(self.sampling.stop, self.sampling.grammar),
                       answer=True)

    def reserve(self, n_ctx: int) -> int:
        """Room kept free for the answer: a prompt that fills the context would leave the model nothing to say."""
        return max(1, min(self.sampling.max_tokens, n_ctx // 4))

    def context_used(self, tokenize: Tokenize) -> int:
        """Tokens the conversation so far takes (system text and turns), what the next message is added to."""
        return len(tokenize(self.prompt()))

    def room(self, message: str, tokenize: Tokenize, n_ctx: int) -> Room:
        """What `message` needs of the context by itself (see Room): the one rule for "too long", in _fit and in
        the REPL's /read."""
        return Room(len(tokenize(self.prompt([("user", message)]))), self.reserve(n_ctx), n_ctx)

    @property
    def exchanges(self) -> int:
        return sum(1 for role, _ in self.turns if role == "user")

    # --- changes ---

    def ask(self, message: str, tokenize: Tokenize, n_ctx: int) -> Prepared:
        """Add the user's message and return the prompt for its answer, dropping the oldest turns if needed."""
        if not message.strip():
            raise UserError("the message is empty; type something, or /help for commands")
        self.turns.append(("user", message))
        try:
            return self._fit(tokenize, n_ctx)
        except BaseException:
            self.turns.pop()
            raise

    def retry(self, tokenize: Tokenize, n_ctx: int) -> Prepared:
        """Take back the last answer and return the prompt to write it again."""
        if not self.turns:
            raise UserError("nothing to retry yet: send a message first")
        last = self.turns.pop() if self.turns[-1][0] == "assistant" else None
        try:
            return self._fit(tokenize, n_ctx)
        except BaseException:
            if last is not None:
                self.turns.append(last)
            raise

    def answer(self, text: str) -> None:
        """Keep the answer as it was shown (after Ctrl-C: the part that was shown)."""
        if not self.turns or self.turns[-1][0] != "user":
            raise RuntimeError("an answer needs a message before it")
        self.turns.append(("assistant", text))

    def abandon(self) -> None:
        """The answer failed before anything was shown: forget the message it was for."""
        if self.turns and self.turns[-1][0] == "user":
            self.turns.pop()

    def undo(self) -> Turn:
        """Remove the last message and its answer; return the message (the REPL shows what was taken back)."""
        if not self.turns:
            raise UserError("nothing to undo: the conversation is empty")
        if self.turns[-1][0] == "assistant":
            self.turns.pop()
        return self.turns.pop()

    def clear(self) -> None:
        self.turns.clear()

    def _fit(self, tokenize: Tokenize, n_ctx: int) -> Prepared:
        """Tokens of the prompt for the answer to the last user turn, within n_ctx with room for the answer.

        When it does not fit, the oldest exchanges go until the prompt takes at most half the context (or only the
        new message is left), not just until it fits: every drop changes the start of the prompt, so the engine has
        to evaluate the whole remaining conversation again; dropping more at once makes that happen rarely instead of
        on every turn, as llama.cpp's own context shift does. The system text always stays, and the new message is
        never cut: if it cannot fit by itself, that is an error the user must fix.
        """
        reserve = self.reserve(n_ctx)
        tokens = tokenize(self.prompt())
        if len(tokens) + reserve <= n_ctx:
            return Prepared(tokens)
        room = self.room(self.turns[-1][1], tokenize, n_ctx)
        if not room.fits:
            with_system = " with the system text" if self.system_text else ""
            raise UserError(f"message too long (메시지가 너무 깁니다): it takes {room.alone} tokens{with_system}, "
                            f"plus {reserve} for the answer, but the context holds {n_ctx}; shorten it, or raise the "
                            f"context: /set ctx {room.suggest}")
        dropped = 0
        while len(self.turns) > 1 and (len(tokens) + reserve > n_ctx or len(tokens) > n_ctx // 2):
            del self.turns[:2]
            dropped += 2
            tokens = tokenize(self.prompt())
        return Prepared(tokens, dropped)

    # --- files ---

    def to_dict(self, model: str | None = None, adapters: tuple[str, ...] = ()) -> dict[str, Any]:
        settings = {key: getattr(self.sampling, key) for key in SETTABLE if key != "ctx"} | {"ctx": self.ctx}
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": model}
        if adapters:  # the running model's LoRA adapters: informative, as the model's name is
            data["adapters"] = list(adapters)
        return data | {"template": self.template.name, "system": self.system, "settings": settings,
                       "turns": [{"role": role, "text": text} for role, text in self.turns]}

    @classmethod
    def from_dict(cls, data: object, where: str = "the file", current: Template | None = None) -> Conversation:
        """Check everything before anything is used: a hand-edited or foreign file gets one line naming the field.

        `current` is the running model's template: a chat saved under a model's own Jinja template (name "gguf", not
        one of malhae's) can only be continued with a model that brings one, so that is the one it gets."""
        def bad(what: str) -> UserError:
            return UserError(f"cannot load {where}: {what}")

        if not isinstance(data, dict):
            raise bad(f"it holds a JSON {type(data).__name__}, not a malhae chat (save one with /save FILE)")
        if data.get("format") != FORMAT:
            raise bad(f'not a malhae chat file (no "format": "{FORMAT}"); save one with /save FILE')
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise bad('"version" is missing or not a whole number')
        if version != VERSION:
            newer = "; upgrade malhae to read it" if version > VERSION else ""
            raise bad(f"it is format version {version}, and this malhae reads version {VERSION}{newer}")
        name = data.get("template")
        if not isinstance(name, str):
            raise bad('"template" is missing or not text')
        own = current is not None and name == current.name and name not in templates.all_templates()
        if not own and name not in templates.all_templates():
            hint = "; it was saved with a model's own chat template: load it while running such a model" \
                if name == "gguf" else ""
            raise bad(f"unknown template {name!r} (known: {', '.join(templates.all_templates())}){hint}")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise bad('"system" must be text or null')
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise bad('"settings" must be an object')
        values = {key: check(key, value, f"cannot load {where}: settings.{key} is {value!r}")
                  for key, value in settings.items() if _known_setting(key, where)}
        turns = data.get("turns")
        if not isinstance(turns, list):
            raise bad('"turns" is missing or not a list')
        parsed: list[Turn] = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
                raise bad(f'turns[{i}] must be an object with "role" and "text"')
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.get("role") != expected:
                raise bad(f"turns[{i}].role is {turn.get('role')!r}; expected {expected!r} (user and assistant "
                          "take turns, user first)")
            parsed.append((expected, turn["text"]))
        if len(parsed) % 2:
            raise bad("the last turn is a message without its answer")
        adapters = data.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise bad('"adapters" must be a list of adapter names')
        ctx = values.pop("ctx", None)
        return cls(current if own else templates.get(name), Sampling(**values), ctx, system, parsed, tuple(adapters))


def _known_setting(key: str, where: str) -> bool:
    if key not in SETTABLE:
        raise UserError(f"cannot load {where}: unknown setting {key!r} (known: {', '.join(SETTABLE)})")
    return True


MAX_FILE = 64 << 20  # a chat of a few thousand exchanges is a few MB; /load of anything larger is a mistake
_CHAT_HEAD = re.compile(rb'^\s*\{\s*"format"\s*:\s*"' + FORMAT.encode() + rb'"')


def is_chat_file(path: Path) -> bool:
    """Whether `path` starts the way every file /save writes does ({"format": "malhae-chat", …})."""
    try:
        with open(path, "rb") as f:
            return bool(_CHAT_HEAD.match(f.read(4096)))
    except OSError:
        return False


def save(conversation: Conversation, path: Path, model: str | None = None, force: bool = False,
         adapters: tuple[str, ...] = ()) -> Path:
    """Write the file whole or not at all: a failure half-way must not destroy an earlier save of the same name.

    An existing file is replaced only when asked (`force`) and only if it is an earlier save: `/save x.gguf` once
    turned the model in use into 288 bytes of JSON."""
    path = path.expanduser()
    if path.is_file() and not is_chat_file(path):
        raise UserError(f"{path} exists and is not a malhae chat file; /save never replaces it, choose another "
                        "file name")
    files.check_target(path, force, replace_hint=f"it holds an earlier saved chat; /save {path} --force replaces "
                       "it", other_hint="choose another file name")
    text = json.dumps(conversation.to_dict(model, adapters), ensure_ascii=False, indent=1) + "\n"
    try:
        files.write_text(path, text)
    except OSError as e:
        raise UserError(f"cannot save to {path}: {e.strerror or e}") from None
    return path


def load(path: Path, current: Template | None = None) -> tuple[Conversation, str | None]:
    """The conversation in a file, and the name of the model it was saved with (informative only)."""
    path = path.expanduser()
    where = str(path)
    # verb "load": every message about a chat file that cannot be used starts "cannot load PATH:", as those below
    raw = files.read_user_bytes(path, "", limit=MAX_FILE, fix="give a file saved with /save", verb="load")
    # bounded (nesting, integers), and every text must be characters: a lone surrogate ("\ud800") would load and
    # then fail every prompt and /save
    data = files.parse_json(raw, f"cannot load {where}: it", "give a file saved with /save")
    conversation = Conversation.from_dict(data, where, current)
    model = data.get("model")
    return conversation, model if isinstance(model, str) else None
