"""The serving engine: continuous batching of generations on one set of weights.

One engine per set of weights in a process (a base model, shared by its LoRA
versions, or a full fine-tune). Requests from any number of web threads join a
bounded queue; one scheduler thread admits them into a batch of up to
``max_batch`` sequences as slots free up, runs each newcomer's prompt (prefill),
then advances every sequence past its prompt by one token per forward pass. A
short prompt runs in one pass as it is admitted; a long one runs in chunks, one
per scheduler step and, while other sequences decode, only as often as keeps
prefill to a share of the time (``prefill_share``), so that a running stream
keeps its pace while long prompts arrive. A sequence leaves the batch the moment
it ends (end of answer, stop sequence, token limit, time limit, or its client
went away), and a waiting one takes its slot at the next step.

The decoder is a lean re-implementation of the Llama forward pass (SmolLM2 is
a Llama) over a static key/value cache, with the same arithmetic as
transformers' own, so greedy text equals `model.generate`'s. Plain
`generate` spends most of a step outside the matrix products; here a step is
the products, a few dozen element-wise operations per layer and nothing else.

Weights are fp32 by default. A lone sequence's steps use torch's products, the
same arithmetic as `generate`; the steps of several sequences go through native
kernels (inference/native), since torch's product repacks the weights on every
call and runs at a third of the memory's speed for a handful of rows.
``quantize="int8"`` also keeps the projection and output-head weights as int8
with one scale per output channel, to draft tokens with (the native kernels read
a quarter of the bytes per token, with fp32 activations) while one or two
sequences run; one pass over the fp32 weights checks the drafts and chooses
every token given out, so the text is fp32's. Prompts always run on the fp32
weights. LoRA versions are low-rank deltas applied next to the shared base
projections, per row of the batch, so one batch mixes the base model and any
adapters.
"""

import logging
import math
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from inference import telemetry

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8")
_EXACT_CANDIDATES = 64
# int8 drafting: tokens drafted per round, and the most sequences in a batch for which drafting
# beats plain fp32 steps (measured here: 67 against 56 tokens/s at 2 sequences, 86 against 94 at 4).
_DRAFT_TOKENS = 8
_DRAFT_MAX_ROWS = 2
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


class EngineError(Exception):
    pass


class UnsupportedModel(EngineError):
    pass


class EngineClosed(EngineError):
    """The weights were unloaded after the caller got them: load the version again."""


class QueueFull(EngineError):
    def __init__(self, retry_after, *, reason="the generation queue is full"):
        super().__init__(f"{reason}; retry in {retry_after} s")
        self.retry_after = retry_after


# --- Weights ------------------------------------------------------------------


class _Projection:
    """One linear layer (several fused along the output: q|k|v, gate|up)."""

    def __init__(self, weight, bias, kernels, *, quantize):
        import torch

        self.bias = bias
        self.out_features = weight.shape[0]
        # fp32 always: a prompt (many rows at once) is compute-bound, and fp32 products beat
        # dequantising int8 on every prompt by a third here.
        self.dense = self.weight = weight.contiguous()
        self.scales = None
        self.kernels = kernels
        if quantize:
            # Decoding (a few rows per step) is bound by the bytes read: int8 with one scale per
            # output channel, multiplied with fp32 activations by the native kernel.
            scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.weight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scales.to(torch.float32).contiguous()

    def __call__(self, x, *, kernel=None):
        """x @ W.T (+ bias). ``kernel`` None: torch's fp32 product (prompts, and a lone
        sequence's steps on an fp32 engine: transformers' own numbers); "f32" or "int8": the
        native kernel on the fp32 or int8 weights, which computes each row on its own. A decode
        step's layers run in kernels.decode_layers from the same weights; this serves the head
        and torch's path."""
        import torch.nn.functional as F

        if kernel is None:
            return F.linear(x, self.dense, self.bias)
        if kernel == "int8":
            y = self.kernels.int8_linear(x.contiguous(), self.weight, self.scales)
        else:
            y = self.kernels.f32_linear(x.contiguous(), self.dense)
        return y if self.bias is None else y + self.bias

    def nbytes(self):
        size = self.dense.numel() * 4
        return size + (0 if self.scales is None else self.weight.numel() + self.scales.numel() * 4)


@dataclass
class _Layer:
    input_norm: object
    qkv: _Projection
    o: _Projection
    post_norm: object
    gate_up: _Projection
    down: _Projection


# The projections of a layer, in the fused groups the decoder runs them in.
GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


class DecoderWeights:
    """A Llama-family causal LM's weights laid out for decoding."""

    def __init__(self, model, *, quantize="none"):
        import torch

        if quantize not in QUANTIZE_CHOICES:
            raise EngineError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
        config = model.config
        if config.model_type != "llama" or getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(
                f"the serving engine runs Llama-family models (SmolLM2 and its fine-tunes), not {config.model_type!r}"
            )
        self.quantized = quantize == "int8"
        self.kernels = None
        from inference import native

        try:
            self.kernels = native.kernels()
        except native.NativeUnavailable as exc:
            if self.quantized:
                raise EngineError(f"INFERENCE_QUANTIZE=int8: {exc}") from exc
            # fp32 still runs: batched steps then go through torch's products, about half as fast.
            logger.warning("fp32 batched decoding falls back to torch's products: %s", exc)
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                modules = {name: layer.get_submodule(path) for name, path in _MODULE_PATHS.items()}

                def fused(group, modules=modules):
                    linears = [modules[name] for name in GROUPS[group]]
                    weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight
                    biases = [m.bias for m in linears]
                    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
                    return _Projection(weight.detach().to(torch.float32), bias, self.kernels, quantize=self.quantized)

                self.layers.append(
                    _Layer(
                        input_norm=layer.input_layernorm.weight.detach(),
                        qkv=fused("qkv"),
                        o=fused("o"),
                        post_norm=layer.post_attention_layernorm.weight.detach(),
                        gate_up=fused("gate_up"),
                        down=fused("down"),
                    )
                )
            self.norm = model.model.norm.weight.detach()
            self.embed = model.model.embed_tokens.weight.detach()
            self.lm_head = _Projection(model.lm_head.weight.detach(), None, self.kernels, quantize=self.quantized)
            # transformers' own rotary module, evaluated once for every position: any rope variant the
            # checkpoint declares, with the same arithmetic as at training time.
            positions = torch.arange(self.max_positions)[None]
            probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
            cos, sin = model.model.rotary_emb(probe, positions)
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        # The per-layer tensors of the native decode step (kernels.decode_layers), by kernel.
        self.native_layers = {}
        if self.kernels is not None:
            none = torch.empty(0)
            for kernel in ("int8", "f32") if self.quantized else ("f32",):

                def parts(p, kernel=kernel):
                    if kernel == "int8":
                        return [p.weight, p.scales, none if p.bias is None else p.bias]
                    return [p.dense, none, none if p.bias is None else p.bias]

                self.native_layers[kernel] = [
                    [
                        layer.input_norm, *parts(layer.qkv), *parts(layer.o),
                        layer.post_norm, *parts(layer.gate_up), *parts(layer.down),
                    ]
                    for layer in self.layers
                ]  # fmt: skip
        self.group_slices = {
            "qkv": {
                "q_proj": (0, self.num_heads * self.head_dim),
                "k_proj": (self.num_heads * self.head_dim, (self.num_heads + self.num_kv_heads) * self.head_dim),
                "v_proj": (
                    (self.num_heads + self.num_kv_heads) * self.head_dim,
                    (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                ),
            },
            "o": {"o_proj": (0, self.hidden_size)},
            "gate_up": {
                "gate_proj": (0, self.layers[0].gate_up.out_features // 2),
                "up_proj": (self.layers[0].gate_up.out_features // 2, self.layers[0].gate_up.out_features),
            },
            "down": {"down_proj": (0, self.hidden_size)},
        }

    def nbytes(self):
        projections = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        total = sum(p.nbytes() for p in projections) + self.embed.numel() * 4
        if self.lm_head.dense.data_ptr() != self.embed.data_ptr():  # not tied
            total += self.lm_head.dense.numel() * 4
        return total + (0 if self.lm_head.scales is None else self.lm_head.weight.numel() + self.vocab_size * 4)


class Adapter:
    """A LoRA version as plain tensors: for each layer and fused group, ``A``
    (the groups' lora_A stacked) and ``B`` (lora_B block-diagonal, times the
    scaling), so that delta = (x @ A.T) @ B.T."""

    def __init__(self, name, state, config, decoder):
        import torch

        if config.get("use_dora") or config.get("fan_in_fan_out"):
            raise EngineError("DoRA and fan_in_fan_out adapters are not supported")
        r = int(config["r"])
        alpha = float(config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        self.name = name
        self.layers = []
        found = 0
        for index in range(len(decoder.layers)):
            groups = {}
            for group, slices in decoder.group_slices.items():
                blocks = []
                for projection, (start, end) in slices.items():
                    prefix = f"base_model.model.model.layers.{index}.{_MODULE_PATHS[projection]}"
                    a, b = state.get(f"{prefix}.lora_A.weight"), state.get(f"{prefix}.lora_B.weight")
                    if a is None or b is None:
                        continue
                    if b.shape[0] != end - start:
                        raise EngineError(f"{prefix}: lora_B has {b.shape[0]} rows, the model {end - start}")
                    blocks.append((start, end, a.to(torch.float32), b.to(torch.float32) * scaling))
                if not blocks:
                    continue
                found += len(blocks)
                out = max(e for _, e in slices.values())  # the fused group's width
                rank = sum(a.shape[0] for _, _, a, _ in blocks)
                big_b = torch.zeros(out, rank)
                offset = 0
                for start, end, a, b in blocks:
                    big_b[start:end, offset : offset + a.shape[0]] = b
                    offset += a.shape[0]
                groups[group] = (torch.cat([a for _, _, a, _ in blocks]).contiguous(), big_b)
            self.layers.append(groups)
        if not found:
            raise EngineError("the adapter has no LoRA weights for this model's layers")


# --- Requests -----------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


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

    def __init__(self, *, engine, prompt_ids, sampling, n, max_new_tokens, stops, adapter, deadline):
        self.engine = engine
        self.prompt_ids = prompt_ids
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
    sampling: Sampling
    max_new_tokens: int
    text: _TextStream
    adapter: Adapter | None
    tokens: list = field(default_factory=list)
    position: int = 0  # tokens in the cache (while prefilling, the prompt's so far)
    generator: object = None
    started_at: float = 0.0

    def __post_init__(self):
        import torch

        if self.sampling.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.generation.seed + self.index)

    @property
    def prefilling(self):
        """In a slot, its prompt not all in the cache yet: the first token comes with the last chunk."""
        return not self.tokens


# --- The engine ---------------------------------------------------------------


class Engine:
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

    def submit(self, *, prompt_ids, sampling, n=1, max_new_tokens, stops=(), adapter=None, timeout):
        if len(prompt_ids) + max_new_tokens > self.max_tokens:
            raise EngineError(
                f"the prompt is {len(prompt_ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the {self.max_tokens}-token context"
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
        import torch
        import torch.nn.functional as F

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
        import torch

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
        import torch

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
            self._emit(slot, sequence, self._choose(sequence, logits[0]))
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

    def _step(self):
        """One token (or an int8 round's) for every sequence past its prompt."""
        import torch

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
            self._emit(slot, sequence, self._choose(sequence, logits[row]))

    def _decoding(self):
        """([(slot, sequence)] of the sequences past their prompt, by slot; their slots as a
        tensor, or None when row i is in slot i, as when no prompt is running)."""
        import torch

        rows = [(slot, s) for slot, s in enumerate(self._active) if not s.prefilling]
        slots = None if len(rows) == len(self._active) else torch.tensor([slot for slot, _ in rows])
        return rows, slots

    def _speculate(self, drafts):
        """An int8 engine's round: ``drafts`` tokens drafted on the int8 weights for every
        sequence, then every sequence's drafts checked in one pass over the fp32 weights, which
        also gives the fp32 choice after each one's last draft. The sequence takes the fp32
        choices up to and including the first one its draft missed: the tokens fp32 decoding
        would give (the same draws for a seeded sample), for about one fp32 pass per round."""
        import torch

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
                tokens[row] = self._choose(sequence, logits[row], history=sequence.tokens + drafted[row])
                drafted[row].append(tokens[row])
        # The check: every sequence's last token and drafts, in its own slot at its next positions,
        # one pass over the fp32 weights for all of them.
        checks = [[s.tokens[-1], *drafted[row]] for row, s in enumerate(batch)]
        logits = self._decode_native(
            torch.tensor([token for ids in checks for token in ids])[:, None],
            torch.tensor([starts[row] + i for row, ids in enumerate(checks) for i in range(len(ids))]),
            kernel="f32",
            slots=torch.tensor([slot for (slot, _), ids in zip(rows, checks, strict=True) for _ in ids]),
        )
        checked = logits.view(len(batch), drafts + 1, -1)
        for row in range(len(rows) - 1, -1, -1):
            slot, sequence = rows[row]
            if states[row] is not None:
                sequence.generator.set_state(states[row])
            for index, logits in enumerate(checked[row]):
                token = self._choose(sequence, logits)
                sequence.position += 1
                if self._emit(slot, sequence, token) or index == drafts or token != drafted[row][index]:
                    break

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

    def _choose(self, sequence, logits, history=None):
        """The next token from ``logits``, after ``history`` (default: the sequence's tokens)."""
        import torch

        sampling = sequence.sampling
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

    # The decoder.

    def _forward(self, tokens, positions, *, prefill, slot=None, adapter=None, every=False, start=0, slots=None):
        """Logits of the last position (of every position with ``every``), on the fp32 weights.
        Prefill: ``tokens`` is [1, T], one sequence's prompt from position ``start`` (the keys
        and values before it already in ``slot``), its keys and values kept in ``slot``
        (unless None). Decode: [B, 1], row i in cache slot ``slots[i]`` (default i) at
        positions[i]; several rows, or any on an int8 engine, go through the native kernels."""
        import torch
        import torch.nn.functional as F

        d = self.decoder
        if not prefill and d.kernels is not None and (tokens.shape[0] > 1 or d.quantized):
            return self._decode_native(tokens, positions, kernel="f32", slots=slots)
        batch, length = tokens.shape
        rows = batch * length
        if prefill:
            adapters = [] if adapter is None else [(adapter, None)]
            cos, sin = d.cos[start : start + length], d.sin[start : start + length]  # [T, hd]: over heads
            span = start + length
            # After a reused opening: each new token sees the opening and the new tokens up to itself.
            mask = (torch.arange(span)[None] <= torch.arange(start, span)[:, None]) if start else None
        else:
            cos, sin = d.cos[positions][:, None, None], d.sin[positions][:, None, None]  # [B, 1, 1, hd]
            span = int(positions.max()) + 1
            # True where a row must not look: past its own length.
            mask = None if batch == 1 else (torch.arange(span)[None] > positions[:, None])[:, None, None]
            adapters = self._adapter_rows(slots)
            if slots is None:
                slots = torch.arange(batch)
                cached = slice(0, batch)
            elif batch == 1:  # a view of the one slot, not a copy of its keys and values
                cached = slice(int(slots[0]), int(slots[0]) + 1)
            else:
                cached = slots
        hidden = d.embed[tokens.reshape(-1)]  # [rows, D]
        heads, kv_heads, scale = d.num_heads, d.num_kv_heads, d.head_dim**-0.5
        q_width, kv_width = heads * d.head_dim, kv_heads * d.head_dim
        for index, layer in enumerate(d.layers):
            x = _rms_norm(hidden, layer.input_norm, d.eps)
            qkv = self._project(layer.qkv, x, index, "qkv", adapters)
            # Rotary embedding on the queries and keys at once: element-wise, so the same numbers.
            qk = qkv[:, : q_width + kv_width].view(batch, length, heads + kv_heads, d.head_dim).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split((heads, kv_heads), dim=1)
            v = qkv[:, q_width + kv_width :].view(batch, length, kv_heads, d.head_dim).transpose(1, 2)
            if prefill:
                if slot is not None:
                    self._keys[index, slot, :, start:span] = k[0]
                    self._values[index, slot, :, start:span] = v[0]
                if start:
                    keys = self._keys[index, slot : slot + 1, :, :span]
                    values = self._values[index, slot : slot + 1, :, :span]
                    attended = F.scaled_dot_product_attention(
                        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
                    )
                else:
                    attended = F.scaled_dot_product_attention(
                        q, k, v, is_causal=length > 1, scale=scale, enable_gqa=True
                    )
                attended = attended.transpose(1, 2).reshape(rows, q_width)
            else:
                self._keys[index, slots, :, positions] = k[:, :, 0]
                self._values[index, slots, :, positions] = v[:, :, 0]
                if isinstance(cached, slice):
                    keys = self._keys[index, cached, :, :span]
                    values = self._values[index, cached, :, :span]
                else:  # rows in scattered slots: copy just their keys and values so far
                    keys = self._keys[index, :, :, :span].index_select(0, cached)
                    values = self._values[index, :, :, :span].index_select(0, cached)
                if mask is None:  # one sequence: transformers' kernel, same numbers
                    attended = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)
                    attended = attended.transpose(1, 2).reshape(rows, q_width)
                else:
                    # One query per row: plain products beat the fused kernel, which is built for long queries.
                    grouped = q.reshape(batch, kv_heads, heads // kv_heads, d.head_dim)
                    scores = (grouped @ keys.transpose(-1, -2)) * scale
                    if mask is not None:
                        scores = scores.masked_fill(mask, float("-inf"))
                    scores = scores.softmax(-1)
                    attended = (scores @ values).reshape(rows, q_width)
            hidden = hidden + self._project(layer.o, attended, index, "o", adapters)
            x = _rms_norm(hidden, layer.post_norm, d.eps)
            gate, up = self._project(layer.gate_up, x, index, "gate_up", adapters).chunk(2, dim=-1)
            hidden = hidden + self._project(layer.down, F.silu(gate) * up, index, "down", adapters)
        last = _rms_norm(hidden if every else hidden.view(batch, length, -1)[:, -1], d.norm, d.eps)
        return self._head(last)

    def _decode_native(self, tokens, positions, *, kernel, slots=None):
        """A decode step through the native kernels (inference/native): one call for every layer,
        fp32 activations throughout, the projections on the int8 or fp32 weights (``kernel``).
        ``tokens`` [rows, 1]: row i in cache slot ``slots[i]`` (default i) at ``positions[i]``.
        Each row's numbers are its own, whatever the other rows are."""
        d = self.decoder
        adapters = self._adapter_rows(slots)
        # Per layer and group, (A, B, rows) of each adapter in the step that has that group.
        deltas = [
            [
                [(*adapter.layers[index][group], rows) for adapter, rows in adapters if group in adapter.layers[index]]
                for group in GROUPS
            ]
            for index in range(len(d.layers))
        ] if adapters else []  # fmt: skip
        hidden = d.kernels.decode_layers(
            d.embed[tokens.reshape(-1)], d.native_layers[kernel], deltas, self._keys, self._values,
            d.cos[positions], d.sin[positions], positions, slots, d.num_heads, d.num_kv_heads, d.head_dim**-0.5, d.eps,
        )  # fmt: skip
        return self._head(d.kernels.rms_norm(hidden, d.norm, d.eps), kernel=kernel)

    def _head(self, last, *, kernel=None):
        """Logits [rows, vocab] of the final hidden states."""
        import torch

        d = self.decoder
        if kernel != "int8":
            return d.lm_head(last, kernel=kernel)
        logits = d.lm_head(last, kernel="int8")
        # A greedy pick and nearly all sampled mass are among the best few: rescore those with
        # the fp32 rows, so int8 changes the choice only when it misranks the best.
        best = logits.topk(min(_EXACT_CANDIDATES, logits.shape[-1]), dim=-1).indices  # [rows, k]
        exact = torch.einsum("rd,rkd->rk", last, d.lm_head.dense[best])
        return logits.scatter_(1, best, exact)

    def _adapter_rows(self, slots=None):
        """[(adapter, rows)] for a step's rows (row i of the sequence in slot ``slots[i]``,
        default i): rows None when every row uses it."""
        import torch

        owners = self._active if slots is None else [self._active[slot] for slot in slots.tolist()]
        groups = {}
        for row, sequence in enumerate(owners):
            if sequence.adapter is not None:
                groups.setdefault(id(sequence.adapter), (sequence.adapter, []))[1].append(row)
        result = []
        for adapter, rows in groups.values():
            every = len(rows) == len(owners)
            result.append((adapter, None if every else torch.tensor(rows)))
        return result

    @staticmethod
    def _project(projection, x, index, group, adapters):
        """``projection`` of ``x`` plus each adapter's delta on its rows (torch's path; the native
        step does the same in kernels.cpp's project)."""
        y = projection(x)
        for adapter, rows in adapters:
            weights = adapter.layers[index].get(group)
            if weights is None:
                continue
            a, b = weights
            x = x.to(a.dtype)
            y = y.to(a.dtype)
            if rows is None:
                y = y + (x @ a.T) @ b.T
            else:
                y = y.index_add(0, rows, (x[rows] @ a.T) @ b.T)
        return y


def _lazy_zeros(shape):
    """A float32 tensor of zeros whose pages the OS zeroes as they are first touched
    (calloc), in 4 KB pages (no transparent huge pages, which numpy asks for): the key/value
    cache then takes memory for the context lengths in use, not for the worst case. Zeros,
    not garbage: a masked position still multiplies a probability of 0 by what it holds,
    and 0 x NaN is NaN."""
    import numpy
    import torch
    from numpy._core.multiarray import _set_madvise_hugepage

    previous = _set_madvise_hugepage(False)
    try:
        return torch.from_numpy(numpy.zeros(shape, dtype=numpy.float32))
    finally:
        _set_madvise_hugepage(previous)


def _rms_norm(x, weight, eps):
    import torch

    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
