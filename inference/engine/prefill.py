"""Prompts: reuse of a recent prompt's opening, and the pacing of long prompts in chunks so that
running streams keep their pace while they arrive."""

import os
import time

import torch

from inference.engine.sampling import choose

# Prompt openings whose keys and values are kept for reuse (per engine), how long they may be,
# and the shortest worth copying.
_PREFIXES_KEPT = 4
_PREFIX_MAX_TOKENS = 256
_PREFIX_MIN_TOKENS = 8
# Prefill. Measured here (SmolLM2-135M, fp32, 2 torch threads, AMD EPYC, medians): a lone stream's
# decode step takes 76 ms; a pass of 16 / 32 / 64 / 128 / 256 prompt tokens (after 300 in the cache)
# 113 / 204 / 257 / 351 / 623 ms, about 80 ms (the weights read once, as in a decode step) plus
# 2.1 ms a token. A 16-token pass every step would take 60% of a stream's pace for 16 tokens a step.
# So a long prompt runs in passes of about _PREFILL_PASS_SECONDS (their size follows the measured
# seconds per prompt token: about 200 tokens here), and while some sequences decode, a pass runs
# only once the decode steps have earned its expected time, at PREFILL_SHARE of their own: the
# streams keep 1 / (1 + share) of their pace in theory (83% at 0.2; here one 0.5 s pass every ~33
# steps, ~6 prompt tokens a step), and wait at most one pass between two tokens (~0.6 s here,
# against a 1.5 s target: room for a slower machine, or an int8 round instead of a step). Over
# HTTP a stream kept 58-75% of its pace at 0.3 (four runs of bench/fault_bench.py: what the
# scheduler does not count, the proxy, the client, caches the passes evict), so 0.2. A prompt with at most
# _PREFILL_AT_ONCE tokens to run goes in one pass as it is admitted, unpaced, as before: product
# prompts are 80-100 tokens (about half of them reused), and pacing those would leave slots idle
# while many clients take turns, since each newcomer's prompt is then a large share of the work.
PREFILL_SHARE = 0.2
_PREFILL_AT_ONCE = 128
_PREFILL_PASS_SECONDS = 0.5
_PREFILL_MIN_TOKENS = 16  # a floor, for a machine so slow (or busy) that half a second holds fewer
# While nothing decodes, passes of this many: a prompt of 1,000 tokens takes 9% longer in two passes
# than in one here (18% in four), and a newcomer waits at most one pass to be admitted.
_PREFILL_IDLE_TOKENS = 512


class PrefillMixin:
    """Engine's prefill: ``_prefill_next`` (called once per scheduler step) and ``_prefill``
    (also called by Engine._admit for a short prompt)."""

    def _prefill_next(self):
        """One prefill pass for the oldest prefilling sequence, if its turn has come: at once
        while nothing decodes; else once the decode steps have earned the time it should take
        (earned before it runs, so that the streams never fall behind their share)."""
        now = time.monotonic()
        # From the last slot down: a finished sequence's slot is refilled by the last one.
        for slot in range(len(self._active) - 1, -1, -1):
            sequence = self._active[slot]
            if sequence.prefilling and sequence.generation.cancelled:
                self._done(sequence, "cancelled", slot=slot)
            elif sequence.prefilling and now > sequence.generation.deadline:
                self._done(sequence, "timeout", slot=slot)
        waiting = [s for s in self._active if s.prefilling]
        decoding = len(waiting) < len(self._active)
        if not waiting or not decoding:
            self._prefill_credit = 0.0
        if not waiting:
            return
        sequence = min(waiting, key=lambda s: s.started_at)
        if self.prefill_chunk is not None:
            count = self.prefill_chunk
        elif decoding:
            count = max(_PREFILL_MIN_TOKENS, round(_PREFILL_PASS_SECONDS / self._prefill_seconds_per_token))
        else:
            count = _PREFILL_IDLE_TOKENS
        count = min(count, len(sequence.generation.prompt_ids) - sequence.position)
        if decoding and self._prefill_credit < count * self._prefill_seconds_per_token:
            return
        seconds = self._prefill(self._active.index(sequence), sequence, count)
        if decoding:
            self._prefill_credit -= seconds

    def _prefill(self, slot, sequence, count):
        """Run the next ``count`` prompt tokens of ``sequence`` into its slot, after those already
        there; after the last, choose its first token. Returns the seconds it took."""

        ids = sequence.generation.prompt_ids
        start = sequence.position
        started = time.perf_counter()
        tokens = torch.tensor([ids[start : start + count]])
        logits = self._forward(tokens, None, prefill=True, slot=slot, adapter=sequence.adapter, start=start)
        seconds = time.perf_counter() - started
        estimate = self._prefill_seconds_per_token
        self._prefill_seconds_per_token = (
            seconds / count if estimate is None else 0.7 * estimate + 0.3 * seconds / count
        )
        sequence.position = start + count
        if sequence.position == len(ids):
            self._prefix_keep(sequence.adapter, ids, slot)
            self._emit(slot, sequence, choose(sequence, logits[0]))
        return seconds

    def _prefix_reuse(self, adapter, ids, slot):
        """Copy into ``slot`` the keys and values of the longest opening this prompt shares
        with a recent one on the same adapter; returns its length (0: none). Prompts built by
        one template share their first dozens of tokens (about half of a product prompt)."""
        best, entry = 0, None
        for key, (cached_ids, keys, values) in self._prefixes.items():
            if key[0] is not adapter:
                continue
            shared = len(os.path.commonprefix([cached_ids, ids[: len(cached_ids)]]))
            if shared > best:
                best, entry = shared, (key, keys, values)
        best = min(best, len(ids) - 1)  # the last prompt token must run: its logits are the answer's first
        if best < _PREFIX_MIN_TOKENS:
            return 0
        key, keys, values = entry
        self._prefixes.move_to_end(key)
        self._keys[:, slot, :, :best] = keys[:, :, :best]
        self._values[:, slot, :, :best] = values[:, :, :best]
        return best

    def _prefix_keep(self, adapter, ids, slot):
        length = min(len(ids), _PREFIX_MAX_TOKENS)
        key = (adapter, tuple(ids[:length]))
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return
        self._prefixes[key] = (
            list(ids[:length]),
            self._keys[:, slot, :, :length].clone(),
            self._values[:, slot, :, :length].clone(),
        )
        while len(self._prefixes) > _PREFIXES_KEPT:
            self._prefixes.popitem(last=False)
