"""Token choice from a row of logits, per the GenerationParams the request came with
(inference/engine/params.py, as the serializers made it): repetition penalty, then greedy, or
temperature with top-k and top-p and one draw from the sequence's own generator."""

import torch


def choose(sequence, logits, history=None):
    """The next token from ``logits``, after ``history`` (default: the sequence's tokens)."""
    sampling = sequence.sampling  # the request's GenerationParams
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sequence.generation.prompt_ids + (sequence.tokens if history is None else history))
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
