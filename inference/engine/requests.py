"""What a request is while the engine serves it: its GenerationParams (inference/engine/params.py),
its sequences (one per ``n``), the stream of stable text each one gives out, and the Completion that
ends it."""

import queue
import secrets
import time
from dataclasses import dataclass, field

import torch

from inference import telemetry
from inference.engine.adapters import Adapter
from inference.engine.params import GenerationParams
from inference.engine.sampling import BannedSequences


@dataclass
class Completion:
    index: int
    text: str
    finish_reason: str  # stop | length | timeout | cancelled
    tokens: int
    finished_at: float = 0.0  # time.monotonic()


class _TextStream:
    """Incremental detokenisation with stop sequences (OpenAI semantics: the
    text ends before the first stop sequence, which is not included). Emits
    only text that can no longer change: not a partial UTF-8 character, not
    the beginning of a possible stop sequence, not trailing whitespace (the
    final text is stripped), so the chunks add up to the final text."""

    def __init__(self, tokenizer, stops):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids = []
        self.sent = ""
        self.stopped = False

    def _text(self):
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def push(self, token):
        """Add a token; returns the new stable text."""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(text[:cut].rstrip())
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        return self._advance(text[: len(text) - hold].rstrip())

    def _advance(self, stable):
        if not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent) :], stable
        return delta

    def final(self):
        """The whole text; the chunk not yet emitted is the tail of it."""
        if self.stopped:
            return self.sent, ""
        text = self._text().strip()
        return text, (text[len(self.sent) :] if text.startswith(self.sent) else "")


class Generation:
    """One request: ``n`` sequences from one prompt. Iterate for events:
    ("chunk", index, text) as text becomes final, ("done", index, Completion)."""

    def __init__(self, *, engine, prompt_ids, sampling, n, max_new_tokens, stops, adapter, deadline, banned=None):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.banned = banned or BannedSequences()  # token sequences it may not write
        self.events = queue.SimpleQueue()
        self.cancelled = False
        self.deadline = deadline
        self.submitted_at = time.monotonic()
        self.first_token_at = None
        # telemetry: made in the web thread that submits; the scheduler thread logs with it.
        self.request_id = telemetry.request_id_get()
        seed = sampling.seed
        if sampling.temperature > 0 and seed is None:
            seed = secrets.randbelow(2**31)
        self.seed = seed
        self.sequences = [
            _Sequence(self, i, sampling, max_new_tokens, _TextStream(engine.tokenizer, stops), adapter)
            for i in range(n)
        ]

    def cancel(self):
        """The client went away: its sequences leave the batch at the next step."""
        self.cancelled = True

    def completion_tokens(self):
        """Tokens generated so far, over every sequence (what a client is charged)."""
        return sum(len(sequence.tokens) for sequence in self.sequences)

    def __iter__(self):
        remaining = len(self.sequences)
        while remaining:
            event = self.events.get()
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                remaining -= 1
            yield event


@dataclass(eq=False)
class _Sequence:
    generation: Generation
    index: int
    sampling: GenerationParams
    max_new_tokens: int
    text: _TextStream
    adapter: Adapter | None
    tokens: list = field(default_factory=list)
    position: int = 0  # tokens in the cache (while prefilling, the prompt's so far)
    generator: object = None
    started_at: float = 0.0

    def __post_init__(self):

        if self.sampling.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.generation.seed + self.index)

    @property
    def prefilling(self):
        """In a slot, its prompt not all in the cache yet: the first token comes with the last chunk."""
        return not self.tokens
