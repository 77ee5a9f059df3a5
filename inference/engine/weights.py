"""A Llama-family model's weights laid out for decoding: fused projections (q|k|v, gate|up), fp32
always and, with ``quantize="int8"``, int8 copies with one scale per output channel to draft tokens
with (inference/engine/speculative.py: the native kernels read a quarter of the bytes per token,
with fp32 activations), and the per-layer tensors the native decode step reads."""

import logging
from dataclasses import dataclass

from inference.engine.errors import EngineError, UnsupportedModel

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "int8")


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
