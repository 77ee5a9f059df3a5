"""A Llama-family model's weights laid out for decoding: fused projections (q|k|v, gate|up) held
as the model's exact weights, and, with ``quantize="int8"``, int8 copies with one scale per output
channel to draft tokens with (inference/engine/speculative.py), and the per-layer tensors the
native decode step reads.

The exact weights are kept in the GGUF block format they were dequantised from whenever that is
lossless (inference/engine/blocks.py): the base model's layers as Q4_1 and its embedding/head as
Q8_0, about a sixth of fp32's memory and of the bytes a decode step reads, expanded by the native
kernels to the very same floats. Weights that are not such blocks (a full fine-tune's) stay fp32,
and so does everything when the native kernels are not built or ``pack`` is off."""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference.engine import blocks
from inference.engine.errors import EngineError, UnsupportedModel

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8")


class _Projection:
    """One linear layer (several fused along the output: q|k|v, gate|up)."""

    def __init__(self, weight, bias, kernels, *, quantize, pack, format="q4_1", packed=None):

        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.kernels = kernels
        self.packed = packed if packed is not None else (blocks.pack(weight, format, kernels) if pack else None)
        # fp32 only when the weights are not blocks: a prompt (many rows at once) is
        # compute-bound, and fp32 products beat dequantising int8 on every prompt by a third here.
        self.dense = weight.contiguous() if self.packed is None else None
        self.weight, self.scales = self.dense, None
        if quantize and self.packed is None:
            # int8 drafts: one scale per output channel, multiplied with fp32 activations by the
            # native kernel; lossy, so every token they draft is checked on the exact weights.
            # Not for blocks: 4-bit blocks read fewer bytes than int8 copies of them would.
            scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.weight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scales.to(torch.float32).contiguous()

    def __call__(self, x, *, kernel=None):
        """x @ W.T (+ bias). Blocks: the native block kernel, always. fp32 weights: ``kernel``
        None, torch's product (prompts, and a lone sequence's steps: transformers' own numbers);
        "exact", the native fp32 kernel, which computes each row on its own. "int8": the native
        kernel on the int8 copy. A decode step's layers run in kernels.decode_layers from the
        same weights; this serves the head, prompts and torch's path."""

        if kernel == "int8" and self.scales is not None:
            y = self.kernels.int8_linear(x.contiguous(), self.weight, self.scales)
        elif self.packed is not None:
            # Prompts too: expanding blocks in registers for every 8 rows beat expanding the
            # weights to floats once for torch's product at every prompt length measured (8 to
            # 100 rows: 2.1x at 100), since the floats are 4-5x the bytes to write and read back.
            y = self.kernels.block_linear(x.contiguous(), *self.packed)
        elif kernel is None:
            return F.linear(x, self.dense, self.bias)
        else:
            y = self.kernels.f32_linear(x.contiguous(), self.dense)
        return y if self.bias is None else y + self.bias

    def rows(self, index):
        """The exact weight rows ``index`` (a LongTensor of any shape) as floats, [*index.shape, in]."""
        if self.packed is None:
            return self.dense[index]
        flat = blocks.rows_dequantize(self.packed, index.reshape(-1), self.kernels)
        return flat.view(*index.shape, self.in_features)

    def exact_parts(self):
        """(weight, scale) of the exact weights as kernels.decode_layers takes them."""

        return self.packed if self.packed is not None else (self.dense, torch.empty(0))

    def nbytes(self):
        size = self.dense.numel() * 4 if self.packed is None else sum(t.numel() * t.element_size() for t in self.packed)
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

    def __init__(self, model, *, quantize="none", pack=True):
        """``pack``: keep weights that are lossless GGUF blocks as blocks (needs the native
        kernels); off, every weight is fp32, the reference the packed engine is tested against."""

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
            # fp32 still runs, at a fraction of the speed: weights that the kernels would read as
            # 4-bit blocks stay fp32, and batched steps go through torch's products.
            logger.warning("decoding falls back to fp32 weights and torch's products: %s", exc)
        pack = pack and self.kernels is not None
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
                    return _Projection(
                        weight.detach().to(torch.float32), bias, self.kernels, quantize=self.quantized, pack=pack
                    )

                self.layers.append(
                    _Layer(
                        input_norm=layer.input_layernorm.weight.detach().clone(),
                        qkv=fused("qkv"),
                        o=fused("o"),
                        post_norm=layer.post_attention_layernorm.weight.detach().clone(),
                        gate_up=fused("gate_up"),
                        down=fused("down"),
                    )
                )
            # Copies, like every packed tensor: a view would keep the loaded checkpoint (mapped from
            # its file, every page of it read while packing) resident for its few norm weights.
            self.norm = model.model.norm.weight.detach().clone()
            embed = model.model.embed_tokens.weight.detach().to(torch.float32)
            self.embed = _Projection(embed, None, self.kernels, quantize=False, pack=pack, format="q8_0")
            head = model.lm_head.weight.detach().to(torch.float32)
            self.tied = tied = head.data_ptr() == embed.data_ptr()
            self.lm_head = _Projection(
                head, None, self.kernels, quantize=self.quantized, pack=pack, format="q8_0",
                packed=self.embed.packed if tied else None,
            )  # fmt: skip
            packed = [p.packed is not None for layer in self.layers for p in _projections(layer)]
            packed.append(self.lm_head.packed is not None)
            if pack and not all(packed):
                logger.info(
                    "%d of %d projections are not lossless GGUF blocks (a full fine-tune's weights): they stay fp32",
                    packed.count(False),
                    len(packed),
                )
            self.packed = any(packed)  # some weights are blocks: decode steps go through the kernels
            if self.quantized and not any(p.scales is not None for layer in self.layers for p in _projections(layer)):
                logger.info(
                    "INFERENCE_QUANTIZE=int8 drafts nothing here: every projection is a 4-bit block, which "
                    "reads fewer bytes per token than an int8 copy would"
                )
                self.quantized = False
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
            for kernel in ("int8", "exact") if self.quantized else ("exact",):

                def parts(p, kernel=kernel):
                    if kernel == "int8" and p.scales is not None:
                        return [p.weight, p.scales, none if p.bias is None else p.bias]
                    return [*p.exact_parts(), none if p.bias is None else p.bias]

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

    def embedding(self, ids):
        """The embeddings [len(ids), D] of the token ids ``ids`` (a LongTensor)."""
        return self.embed.rows(ids)

    def nbytes(self):
        total = sum(p.nbytes() for layer in self.layers for p in _projections(layer)) + self.embed.nbytes()
        head = self.lm_head
        if not self.tied:
            return total + head.nbytes()
        return total + (0 if head.scales is None else head.weight.numel() + head.scales.numel() * 4)


def _projections(layer):
    return (layer.qkv, layer.o, layer.gate_up, layer.down)
