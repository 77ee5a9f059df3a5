"""LoRA versions as plain tensors, applied next to the shared base projections per row of a batch
(by DecoderMixin._project on torch's path, by the native kernels' project otherwise)."""

import math

import torch

from inference.engine.errors import EngineError
from inference.engine.weights import _MODULE_PATHS


class Adapter:
    """A LoRA version as plain tensors: for each layer and fused group, ``A``
    (the groups' lora_A stacked) and ``B`` (lora_B block-diagonal, times the
    scaling), so that delta = (x @ A.T) @ B.T."""

    def __init__(self, name, state, config, decoder):

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
