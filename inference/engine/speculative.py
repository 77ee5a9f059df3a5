"""int8 drafting: on an int8 engine, while one or two sequences decode, tokens are drafted on the
int8 weights and checked in one pass over the fp32 weights, which chooses every token given out, so
the text is fp32's."""

import torch

from inference.engine.sampling import choose

# int8 drafting: tokens drafted per round, and the most sequences in a batch for which drafting
# beats plain fp32 steps (measured here: 67 against 56 tokens/s at 2 sequences, 86 against 94 at 4).
_DRAFT_TOKENS = 8
_DRAFT_MAX_ROWS = 2


class SpeculativeMixin:
    """Engine's int8 rounds (Engine._step calls ``_speculate`` when they pay)."""

    def _speculate(self, drafts):
        """An int8 engine's round: ``drafts`` tokens drafted on the int8 weights for every
        sequence, then every sequence's drafts checked in one pass over the fp32 weights, which
        also gives the fp32 choice after each one's last draft. The sequence takes the fp32
        choices up to and including the first one its draft missed: the tokens fp32 decoding
        would give (the same draws for a seeded sample), for about one fp32 pass per round."""

        rows, slots = self._decoding()
        batch = [s for _, s in rows]
        starts = [s.position for s in batch]
        drafted = [[] for _ in batch]
        # A sampled sequence's generator before its first draw: the check redraws from there.
        states = [None if s.generator is None else s.generator.get_state() for s in batch]
        tokens = [s.tokens[-1] for s in batch]
        for step in range(drafts):
            logits = self._decode_native(
                torch.tensor(tokens)[:, None], torch.tensor([p + step for p in starts]), kernel="int8", slots=slots
            )
            for row, sequence in enumerate(batch):
                tokens[row] = choose(sequence, logits[row], history=sequence.tokens + drafted[row])
                drafted[row].append(tokens[row])
        # The check: every sequence's last token and drafts, in its own slot at its next positions,
        # one pass over the fp32 weights for all of them.
        checks = [[s.tokens[-1], *drafted[row]] for row, s in enumerate(batch)]
        logits = self._decode_native(
            torch.tensor([token for ids in checks for token in ids])[:, None],
            torch.tensor([starts[row] + i for row, ids in enumerate(checks) for i in range(len(ids))]),
            kernel="exact",
            slots=torch.tensor([slot for (slot, _), ids in zip(rows, checks, strict=True) for _ in ids]),
        )
        checked = logits.view(len(batch), drafts + 1, -1)
        for row in range(len(rows) - 1, -1, -1):
            slot, sequence = rows[row]
            if states[row] is not None:
                sequence.generator.set_state(states[row])
            for index, logits in enumerate(checked[row]):
                token = choose(sequence, logits)
                sequence.position += 1
                if self._emit(slot, sequence, token) or index == drafts or token != drafted[row][index]:
                    break
