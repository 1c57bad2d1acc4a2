"""What the batching scheduler (app/runtime/batching.py) is given, a Job, and what it sends back to the job's `emit`.

Apart from the scheduler because the server's API layers (app/serve) read these and nothing of the scheduler's
workings: they build jobs and turn events into OpenAI's or Ollama's answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from malhae.runtime.settings import Lora, Sampling
from malhae.runtime.step import StopReason


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (the raw distribution, before temperature or top-k) and the likeliest
    alternatives at its position; `logprob` is None for the first prompt token, which nothing predicts."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Token:
    """One generated token: `text` is what may be shown now (whole characters, never a stop string; often "")."""

    token: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Prompt:
    """The prompt's own log-probabilities (echo), sent once before any generated token."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Done:
    """The end of a job: why (`reason.openai` and `reason.ollama` say it in the APIs' words), or ERROR with `error`
    saying why."""

    reason: StopReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str  # all released text of the answer
    error: str = ""
    seconds: float = 0.0
    ttft: float = 0.0
    stop_text: str | None = None  # the stop text that ended it (None: an end token, the length, an error)


Event = Token | Prompt | Done


@dataclass
class Job:
    """One sequence to generate: `tokens` is the whole prompt, `max_new` at most what the slot's context has left."""

    tokens: list[int]
    sampling: Sampling
    max_new: int
    emit: Callable[[Event], None]
    logprobs: int | None = None  # None: none; n: each generated token's log-probability and its n likeliest rivals
    echo: bool = False  # also the prompt's log-probabilities (needs its logits: the cache is not reused)
    min_new: int = 0  # neither the end token nor a stop text ends it before this many tokens (vLLM's min_tokens)
    # the LoRA adapters applied while it runs, each at its scale (a server request's `lora`); None: the engine's own
    adapters: tuple[Lora, ...] | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (the client went away); the slot is freed at the next step."""
        self.cancelled = True
