"""The serving engine: continuous batching of generations on one set of weights.

One engine per set of weights in a process (a base model, shared by its LoRA
versions, or a full fine-tune). Requests from any number of web threads join a
bounded queue; one scheduler thread admits them into a batch of up to
``max_batch`` sequences as slots free up, runs each newcomer's prompt (prefill),
then advances every sequence past its prompt by one token per forward pass. A
sequence leaves the batch the moment it ends (end of answer, stop sequence,
token limit, time limit, or its client went away), and a waiting one takes its
slot at the next step.

The modules, one concern each:

- ``scheduler``: the Engine: queue, admission, the decode step, ending
  sequences, the scheduler thread.
- ``prefill``: prompts: reusing a recent prompt's opening, and running long
  prompts in chunks paced to a share of the decode time (``PREFILL_SHARE``),
  so that a running stream keeps its pace while long prompts arrive.
- ``decoder``: the forward pass, a lean re-implementation of Llama's (SmolLM2
  is a Llama) over a static key/value cache, with transformers' arithmetic, so
  greedy text equals `model.generate`'s; decode steps go through the native
  kernels (inference/native), one call for every layer.
- ``speculative``: on an int8 engine, tokens drafted on int8 weights and
  checked by one pass over the exact weights, so the text is theirs.
- ``sampling``: token choice (greedy, temperature, top-k, top-p, repetition
  penalty), and what a generation may not write (the fact guard's bans).
- ``weights``: DecoderWeights, the fused projections: the exact weights (as
  GGUF blocks where that is lossless, else fp32) and int8 drafting copies.
- ``blocks``: finding the GGUF blocks (Q4_1, Q8_0) the fp32 weights came
  from, bit for bit.
- ``adapters``: LoRA versions, applied per row of the batch, so one batch mixes
  the base model and any adapters.
- ``requests``: Generation, its sequences, their text streams and
  Completions.
- ``params``: GenerationParams, what a request asks for, from the serializers
  to the sampler.
- ``errors``: what callers catch.

Every module but ``errors`` and ``params`` imports torch at its top. The web layer imports
those two (what callers catch, what they ask for) while Django starts, and Django starts without
torch (tests/inference/test_loader.py), so this package's other names load on first use.
"""

import importlib

from inference.engine.errors import EngineClosed, EngineError, PromptTooLong, QueueFull, UnsupportedModel
from inference.engine.params import GenerationParams

_LAZY = {
    "Adapter": "adapters",
    "Completion": "requests",
    "DecoderWeights": "weights",
    "Engine": "scheduler",
    "Generation": "requests",
    "PREFILL_SHARE": "prefill",
    "QUANTIZE_CHOICES": "weights",
}

__all__ = [
    "EngineClosed",
    "EngineError",
    "GenerationParams",
    "PromptTooLong",
    "QueueFull",
    "UnsupportedModel",
    *_LAZY,
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
