"""Token choice from a row of logits, per the GenerationParams the request came with
(inference/engine/params.py, as the serializers made it): banned token sequences, repeated
n-grams, the length floor (no end-of-text token before min_new_tokens), repetition penalty, then greedy, or temperature with top-k and top-p and one draw from the sequence's own
generator."""

import re

import torch

_RUN = re.compile(r"[A-Za-z0-9.\-']*$")  # the word being written: letters, digits, and . - ' inside it
_BEFORE = re.compile(r"([A-Za-z0-9][A-Za-z0-9.\-']*)[ -]$")  # the word before it, one space or hyphen away
_CHECKED = 32  # candidates checked against the stems per round: the likeliest, where the choice falls


def squashed(word):
    """A word as the stems are written: lower case, without dots, hyphens and apostrophes."""
    return word.lower().replace(".", "").replace("-", "").replace("'", "")


class BannedSequences:
    """What a generation may not write (the fact guard's, inference/fact_guard.py).

    Token sequences: the last token of one is masked whenever the text so far ends with the
    others. ``anywhere``: the sequences banned wherever they would start (a word's tokens with the
    space before it); ``word_start``: those banned only at the start of the text or after one of
    the ``breaks`` tokens (a word's tokens without a space, which elsewhere would be the middle of
    another word).

    Stems, by text whatever the tokens: ``stems`` (words of at least 6 letters, lower case, no
    spaces, hyphens or dots) may not be written as a word, nor as the word with the one before it
    ("Prime green"), nor begun beyond three quarters of their letters ("AEROREAD"), however the
    tokens split them: a ban on a token sequence alone leaves the model the next most likely
    spelling of the same claim. ``texts``: each token id's text."""

    def __init__(self, anywhere=(), word_start=(), breaks=frozenset(), stems=(), texts=None):
        self.anywhere = self._by_prefix(anywhere)
        self.word_start = self._by_prefix(word_start)
        self.breaks = breaks
        self.stems = tuple((stem, max(5, -(-3 * len(stem) // 4))) for stem in stems)
        self.texts = texts

    @staticmethod
    def _by_prefix(sequences):
        table = {}
        for ids in sequences:
            table.setdefault(tuple(ids[:-1]), set()).add(ids[-1])
        return table, sorted({len(prefix) for prefix in table})

    def __bool__(self):
        return bool(self.anywhere[0] or self.word_start[0] or self.stems)

    def blocked(self, history):
        """The tokens that may not follow ``history`` (the tokens generated so far) by the token
        sequences."""
        found = set()
        table, widths = self.anywhere
        for width in widths:
            if width <= len(history):
                found |= table.get(tuple(history[len(history) - width :]), set())
        table, widths = self.word_start
        for width in widths:
            if width == len(history) or (width < len(history) and history[-width - 1] in self.breaks):
                found |= table.get(tuple(history[len(history) - width :]), set())
        return found

    def writes_stem(self, text):
        """Whether ``text`` ends in a banned stem, or well into one (see the class)."""
        run = _RUN.search(text)
        word = squashed(run.group())
        if not word:
            return False
        candidates = [word]
        before = _BEFORE.search(text, 0, run.start())
        if before and len(squashed(before.group(1))) >= 3:
            candidates.append(squashed(before.group(1)) + word)
        return any(
            word.startswith(stem) or (len(word) >= need and stem.startswith(word))
            for word in candidates
            for stem, need in self.stems
        )

    def mask(self, logits, history):
        """``logits`` with every token masked that would write what is banned after ``history``."""
        blocked = self.blocked(history)
        if blocked:
            logits = logits.index_fill(0, torch.tensor(sorted(blocked)), float("-inf"))
        if not self.stems:
            return logits
        tail = "".join(self.texts[token] for token in history[-12:])
        for _ in range(4):  # rarely more than one round: most candidates write no stem
            top = torch.topk(logits, min(_CHECKED, logits.shape[0])).indices.tolist()
            bad = [token for token in top if self.writes_stem(tail + self.texts[token])]
            if not bad:
                break
            logits = logits.index_fill(0, torch.tensor(bad), float("-inf"))
            if len(bad) < len(top):
                break  # the likeliest allowed token is among those checked
        return logits


def repeating(history, n):
    """The tokens that would complete a token n-gram that ``history`` (the tokens generated so far)
    already holds: those that followed its last n - 1 tokens before. The prompt is not part of
    it, so that the text can say the product's name and attributes as the prompt does."""
    if n < 1 or len(history) < n - 1:
        return set()
    tail = history[len(history) - n + 1 :] if n > 1 else []
    return {history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == tail}


def choose(sequence, logits, history=None):
    """The next token from ``logits``, after ``history`` (default: the sequence's tokens)."""
    sampling = sequence.sampling  # the request's GenerationParams
    history = sequence.tokens if history is None else history
    banned = sequence.generation.banned
    if banned:
        logits = banned.mask(logits, history)
    if sampling.no_repeat_ngram_size:
        repeats = repeating(history, sampling.no_repeat_ngram_size)
        if repeats:
            logits = logits.index_fill(0, torch.tensor(sorted(repeats)), float("-inf"))
    if len(history) < sampling.min_new_tokens:
        logits = logits.index_fill(0, sequence.generation.engine.stop_token_tensor, float("-inf"))
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sequence.generation.prompt_ids + history)
        score = logits.gather(0, seen)
        score = torch.where(score < 0, score * sampling.repetition_penalty, score / sampling.repetition_penalty)
        logits = logits.scatter(0, seen, score)
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    # Inverse-CDF sampling with one uniform draw from the sequence's own generator: the
    # same seed gives the same tokens whatever else shares the batch.
    cumulative = logits.softmax(-1).cumsum(-1)
    draw = torch.rand((), generator=sequence.generator) * cumulative[-1]
    return int(torch.searchsorted(cumulative, draw.reshape(1)).clamp(max=logits.shape[0] - 1))
