"""The Engine: a bounded queue that web threads submit to, and one scheduler thread that admits
waiting sequences into free slots of the batch, paces prompts (PrefillMixin), advances every
sequence past its prompt one token per forward pass (DecoderMixin) or one int8 round
(SpeculativeMixin), and ends each one the moment it is done."""

import logging
import math
import threading
import time
from collections import OrderedDict, deque

import torch
import torch.nn.functional as F

from inference import telemetry
from inference.engine.decoder import DecoderMixin, _lazy_zeros
from inference.engine.errors import EngineClosed, EngineError, PromptTooLong, QueueFull
from inference.engine.prefill import _PREFILL_AT_ONCE, PREFILL_SHARE, PrefillMixin
from inference.engine.requests import Completion, Generation
from inference.engine.sampling import choose
from inference.engine.speculative import _DRAFT_MAX_ROWS, _DRAFT_TOKENS, SpeculativeMixin

# The name the engine logged under as one module: operators' log filters (and the telemetry tests) use it.
logger = logging.getLogger("inference.engine")


class Engine(PrefillMixin, SpeculativeMixin, DecoderMixin):
    def __init__(
        self,
        decoder,
        tokenizer,
        *,
        stop_token_ids,
        max_batch,
        max_queue,
        max_tokens,
        name="engine",
        prefill_share=PREFILL_SHARE,
        prefill_chunk=None,
    ):
        """``prefill_share``: while sequences decode, long prompts take at most this share of the
        decode steps' time. ``prefill_chunk``: prompt tokens per prefill pass, and a prompt no
        longer runs at once (None: passes of about _PREFILL_PASS_SECONDS while sequences decode,
        of _PREFILL_IDLE_TOKENS otherwise; at once up to _PREFILL_AT_ONCE tokens)."""
        if not prefill_share > 0:
            raise EngineError(f"prefill_share must be positive, not {prefill_share!r}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be at least 1, not {prefill_chunk!r}")
        self.name = name  # telemetry: the engine's label in the metrics
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_token_tensor = torch.tensor(sorted(self.stop_token_ids), dtype=torch.long)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_tokens = min(max_tokens, decoder.max_positions)
        shape = (len(decoder.layers), max_batch, decoder.num_kv_heads, self.max_tokens, decoder.head_dim)
        self._keys, self._values = _lazy_zeros(shape), _lazy_zeros(shape)
        self._prefixes = OrderedDict()  # (adapter, token ids) -> (ids, keys, values), oldest first
        self._pending = deque()
        self._active = []  # the sequence in slot i of the cache is _active[i]
        self._cond = threading.Condition()
        self._closing = False
        self._seconds_per_sequence = 5.0  # a running estimate, for Retry-After
        self.prefill_share = prefill_share
        self.prefill_chunk = prefill_chunk
        # A running estimate, from the first pass on: a sequence decodes only after a pass of its own.
        self._prefill_seconds_per_token = None
        # Seconds of prefill the decode steps have earned (share x their time) less those spent.
        self._prefill_credit = 0.0
        self._thread = threading.Thread(target=self._run, name=f"genapi-{name}", daemon=True)
        self._thread.start()

    # The web threads' side.

    def submit(self, *, prompt_ids, sampling, n=1, max_new_tokens, stops=(), adapter=None, timeout, banned=None):
        """Queue a generation; ``banned``: a BannedSequences (engine/sampling.py) it may not write."""
        if len(prompt_ids) + max_new_tokens > self.max_tokens:
            raise PromptTooLong(
                f"the prompt is {len(prompt_ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's {self.max_tokens}-token context"
            )
        generation = Generation(
            engine=self,
            prompt_ids=list(prompt_ids),
            sampling=sampling,
            n=n,
            max_new_tokens=max_new_tokens,
            stops=stops,
            adapter=adapter,
            deadline=time.monotonic() + timeout,
            banned=banned,
        )
        with self._cond:
            if self._closing:
                raise EngineClosed("this model was unloaded")
            waiting = len(self._pending) + len(self._active)
            # The time the ones ahead will take before this one's turn (sequences in flight finish
            # max_batch at a time). A request that would time out before it starts is refused now,
            # with when to come back, rather than queued to fail later: a queue of slow sequences,
            # or a machine slowed by a flood of requests, admits fewer.
            wait = self._seconds_per_sequence * max(0, waiting + n - self.max_batch) / self.max_batch
            # A request larger than the whole queue still gets in when the queue is empty.
            full = len(self._pending) + n > self.max_queue
            if self._pending and (full or wait > timeout):
                retry = math.ceil(self._seconds_per_sequence * max(1, waiting) / self.max_batch)
                reason = "the generation queue is full" if full else (
                    f"the server is overloaded: this request would wait about {wait:.0f} s, more than its "
                    f"{timeout:g} s time limit"
                )  # fmt: skip
                raise QueueFull(max(1, retry), reason=reason)
            self._pending.extend(generation.sequences)
            self._cond.notify()
        return generation

    def target_loss(self, prompt_ids, target_ids, *, adapter=None):
        """(summed negative log-likelihood, token count) of ``target_ids`` after ``prompt_ids``,
        teacher-forced on these weights (and ``adapter``): the validation loss training reports when
        nothing is cut at max_seq_length (training scores examples as cut, and drops those that do not fit).
        One prompt-sized pass outside the batch; it keeps nothing in the cache."""

        if not target_ids:
            return 0.0, 0
        ids = list(prompt_ids) + list(target_ids)
        if len(ids) > self.max_tokens:
            raise EngineError(f"the example is {len(ids)} tokens, more than the {self.max_tokens}-token context")
        # fp32 also on an int8 engine: every token it gives out is the fp32 weights' choice.
        with torch.inference_mode():
            logits = self._forward(torch.tensor([ids[:-1]]), None, prefill=True, adapter=adapter, every=True)
        predicted = logits[len(prompt_ids) - 1 :]
        loss = F.cross_entropy(predicted, torch.tensor(list(target_ids)), reduction="sum")
        return float(loss), len(target_ids)

    def load(self):
        """(sequences in the batch, sequences waiting)."""
        with self._cond:
            return len(self._active), len(self._pending)

    def close(self, *, wait=0.0):
        """Stop once the sequences in flight and waiting are done; wait up to
        ``wait`` seconds for that."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if wait:
            self._thread.join(wait)

    # The scheduler thread.

    def _run(self):

        with torch.inference_mode():
            while True:
                with self._cond:
                    self._load_report()  # telemetry
                    while not self._pending and not self._active:
                        if self._closing:
                            self._keys = self._values = None
                            return
                        self._cond.wait()
                    self._sweep()
                    admitted = []
                    while self._pending and len(self._active) + len(admitted) < self.max_batch:
                        admitted.append(self._pending.popleft())
                    self._load_report(admitted=len(admitted))  # telemetry
                try:
                    for sequence in admitted:
                        self._admit(sequence)
                    self._prefill_next()
                    if any(not s.prefilling for s in self._active):
                        started = time.perf_counter()
                        self._step()
                        if any(s.prefilling for s in self._active):
                            self._prefill_credit += self.prefill_share * (time.perf_counter() - started)
                except Exception as exc:  # never leave a client waiting on a dead batch
                    logger.exception("Generation failed")
                    # Prefilling sequences too: they hold slots; an admitted one may not have one yet.
                    failed = [*self._active, *(s for s in admitted if s not in self._active)]
                    for sequence in failed:
                        sequence.generation.events.put(("error", exc))
                    self._active.clear()
                    # telemetry: the traceback above is the batch's; each request's own line says it failed.
                    for generation in dict.fromkeys(s.generation for s in failed):
                        with telemetry.request_id_bound(generation.request_id):
                            logger.error("This request's generation failed with its batch: %s", exc)

    def _load_report(self, *, admitted=0):
        """telemetry: this engine's batch and queue, for the gauges (0 and 0 once it closes)."""
        closed = self._closing and not self._pending and not self._active
        telemetry.engine_load_set(
            self.name, running=0 if closed else len(self._active) + admitted, waiting=len(self._pending)
        )

    def _sweep(self):
        """Answer the waiting sequences whose client left or whose time is up, freeing their places."""
        now = time.monotonic()
        if not any(s.generation.cancelled or now > s.generation.deadline for s in self._pending):
            return
        keep = deque()
        for sequence in self._pending:
            if sequence.generation.cancelled:
                self._done(sequence, "cancelled", slot=None)
            elif now > sequence.generation.deadline:
                self._done(sequence, "timeout", slot=None)
            else:
                keep.append(sequence)
        self._pending = keep

    def _admit(self, sequence):
        """Give ``sequence`` a slot; a short prompt runs at once, a long one in later steps."""
        generation = sequence.generation
        if generation.cancelled:
            return self._done(sequence, "cancelled", slot=None)
        if time.monotonic() > generation.deadline:
            return self._done(sequence, "timeout", slot=None)
        slot = len(self._active)
        self._active.append(sequence)
        sequence.started_at = time.monotonic()
        ids = generation.prompt_ids
        sequence.position = self._prefix_reuse(sequence.adapter, ids, slot)
        if len(ids) - sequence.position <= (self.prefill_chunk or _PREFILL_AT_ONCE):
            self._prefill(slot, sequence, len(ids) - sequence.position)

    def _step(self):
        """One token (or an int8 round's) for every sequence past its prompt."""

        rows, slots = self._decoding()
        batch = [s for _, s in rows]
        if self.decoder.quantized and len(batch) <= _DRAFT_MAX_ROWS:
            # Never past a sequence's token limit (nor so past the end of the cache).
            drafts = min(_DRAFT_TOKENS, min(s.max_new_tokens - len(s.tokens) for s in batch) - 1)
            if drafts > 0:
                return self._speculate(drafts)
        tokens = torch.tensor([[s.tokens[-1]] for s in batch])
        positions = torch.tensor([s.position for s in batch])
        logits = self._forward(tokens, positions, prefill=False, slots=slots)
        for sequence in batch:
            sequence.position += 1
        # From the last slot down: a finished sequence's slot is refilled by the last one, which
        # is behind us (or prefilling).
        for row in range(len(rows) - 1, -1, -1):
            slot, sequence = rows[row]
            self._emit(slot, sequence, choose(sequence, logits[row]))

    def _decoding(self):
        """([(slot, sequence)] of the sequences past their prompt, by slot; their slots as a
        tensor, or None when row i is in slot i, as when no prompt is running)."""

        rows = [(slot, s) for slot, s in enumerate(self._active) if not s.prefilling]
        slots = None if len(rows) == len(self._active) else torch.tensor([slot for slot, _ in rows])
        return rows, slots

    def _emit(self, slot, sequence, token):
        """Add the next token to ``sequence``; report text; end it if it is done (returns True)."""
        generation = sequence.generation
        sequence.tokens.append(token)
        if generation.first_token_at is None:
            generation.first_token_at = time.monotonic()
            telemetry.first_token_observe(generation.first_token_at - generation.submitted_at)  # telemetry
        if token in self.stop_token_ids:
            return self._done(sequence, "stop", slot=slot)
        delta = sequence.text.push(token)
        if delta:
            generation.events.put(("chunk", sequence.index, delta))
        if sequence.text.stopped:
            return self._done(sequence, "stop", slot=slot)
        if len(sequence.tokens) >= sequence.max_new_tokens:
            return self._done(sequence, "length", slot=slot)
        if generation.cancelled:
            return self._done(sequence, "cancelled", slot=slot)
        if time.monotonic() > generation.deadline:
            return self._done(sequence, "timeout", slot=slot)
        return False

    def _done(self, sequence, reason, *, slot):
        text, tail = sequence.text.final()
        generation = sequence.generation
        # telemetry: tokens by model, and one line per sequence carrying its request's id.
        model = self.name if sequence.adapter is None else sequence.adapter.name
        telemetry.tokens_count(model, len(sequence.tokens))
        with telemetry.request_id_bound(generation.request_id):
            logger.info(
                "Sequence %d done (%s) after %d tokens",
                sequence.index,
                reason,
                len(sequence.tokens),
                extra={"model": model, "finish_reason": reason, "tokens": len(sequence.tokens)},
            )
        if tail and reason in ("stop", "length"):
            generation.events.put(("chunk", sequence.index, tail))
        generation.events.put(
            ("done", sequence.index, Completion(sequence.index, text, reason, len(sequence.tokens), time.monotonic()))
        )
        if slot is None:
            return True
        if sequence.started_at:
            seconds = time.monotonic() - sequence.started_at
            self._seconds_per_sequence = 0.8 * self._seconds_per_sequence + 0.2 * seconds
        last = len(self._active) - 1
        if slot != last:
            moved = self._active[last]
            length = moved.position
            self._keys[:, slot, :, :length] = self._keys[:, last, :, :length]
            self._values[:, slot, :, :length] = self._values[:, last, :, :length]
            self._active[slot] = moved
        self._active.pop()
        return True
