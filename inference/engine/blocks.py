"""Lossless packing of fp32 weights into the GGUF block formats the base model ships in.

The base model's fp32 weights are the shipped GGUF's blocks dequantised (`prepare_base_model`):
each block of 32 weights along the input is ``d * q + m`` (Q4_1: 4-bit q, fp16 d and m; the
layers) or ``d * q`` (Q8_0: 8-bit q, fp16 d; the embedding, which is also the head). Those
values fit the blocks they came from exactly, so this module finds each block's d, m and q again
from the floats and keeps them: about a sixth (Q4_1) or a quarter (Q8_0) of fp32's bytes, from
which the native kernels expand the very same floats in registers (kernels.cpp, block_linear).

A pack is kept only if expanding it gives back every weight bit for bit; any other tensor (a
full fine-tune's, a LoRA version merged into its base) stays fp32. Nothing is rounded here.
"""

import torch

FORMATS = ("q4_1", "q8_0")


def pack(weight, format, kernels):
    """(values, scale) holding exactly ``weight`` [out, in] fp32 as blocks of ``format``: q4_1
    (uint8 nibbles [out, in / 2], (d, m) [out, in / 32, 2]) or q8_0 (int8 [out, in], d
    [out, in / 32]); None when it is not such a tensor. kernels.cpp's block_pack checks every
    block by expanding it as the products do."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % 32:
        return None
    values, scale, exact = kernels.block_pack(weight.contiguous(), format)
    return (values, scale) if exact else None


def rows_dequantize(packed, rows, kernels):
    """The float rows ``rows`` (a LongTensor of indices) of a packed [out, in] tensor: the
    embedding of some tokens."""
    values, scale = packed
    return kernels.block_dequantize(values.index_select(0, rows), scale.index_select(0, rows))
