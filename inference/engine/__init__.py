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
  greedy text equals `model.generate`'s; several sequences' steps go through the
  native kernels (inference/native).
- ``speculative``: on an int8 engine, tokens drafted on int8 weights and
  checked by one fp32 pass, so the text is fp32's.
- ``sampling``: token choice (greedy, temperature, top-k, top-p, repetition
  penalty).
- ``weights``: DecoderWeights, the fused fp32 (and int8) projections.
- ``adapters``: LoRA versions, applied per row of the batch, so one batch mixes
  the base model and any adapters.
- ``requests``: Sampling, Generation, its sequences, their text streams and
  Completions.
- ``errors``: what callers catch.

torch is imported inside the functions that use it, not at the top of a module: the web layer
imports this package (through inference.loader) while Django starts, and Django starts without
torch (tests/inference/test_loader.py).
"""

from inference.engine.adapters import Adapter
from inference.engine.errors import EngineClosed, EngineError, PromptTooLong, QueueFull, UnsupportedModel
from inference.engine.prefill import PREFILL_SHARE
from inference.engine.requests import Completion, Generation, Sampling
from inference.engine.scheduler import Engine
from inference.engine.weights import QUANTIZE_CHOICES, DecoderWeights

__all__ = [
    "PREFILL_SHARE",
    "QUANTIZE_CHOICES",
    "Adapter",
    "Completion",
    "DecoderWeights",
    "Engine",
    "EngineClosed",
    "EngineError",
    "Generation",
    "PromptTooLong",
    "QueueFull",
    "Sampling",
    "UnsupportedModel",
]
