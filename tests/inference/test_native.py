"""The native decode kernels (inference/native) against torch's own arithmetic."""

import pytest
import torch

from inference import native


@pytest.fixture(scope="module")
def kernels():
    return native.kernels()


def _quantized(out_features, in_features):
    weight = torch.randn(out_features, in_features) * 0.05
    scale = weight.abs().amax(dim=1) / 127
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


# Widths the vector code takes whole (SmolLM2's 576 and 1536), and odd ones it must finish by hand.
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (70, 1536), (33, 48), (7, 20)])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_int8_linear_is_the_dequantised_product_and_each_row_is_its_own(kernels, rows, out_features, in_features):
    torch.manual_seed(rows * 1000 + out_features)
    weight, scale = _quantized(out_features, in_features)
    x, residual = torch.randn(rows, in_features), torch.randn(rows, out_features)
    reference = (x.double() @ (weight.double() * scale.double()[:, None]).T).float()

    y = kernels.int8_linear(x, weight, scale)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.int8_linear(x, weight, scale, residual), residual + reference)
    # Bit for bit the same row whatever else is in the batch: seeds stay reproducible.
    alone = torch.cat([kernels.int8_linear(x[i : i + 1].contiguous(), weight, scale) for i in range(rows)])
    assert torch.equal(alone, y)


@pytest.mark.parametrize("out_features,in_features", [(960, 576), (70, 1536), (33, 48), (7, 20)])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_f32_linear_is_the_product_and_each_row_is_its_own(kernels, rows, out_features, in_features):
    torch.manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features) * 0.05
    x, residual = torch.randn(rows, in_features), torch.randn(rows, out_features)
    reference = (x.double() @ weight.double().T).float()

    y = kernels.f32_linear(x, weight)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.f32_linear(x, weight, residual), residual + reference)
    alone = torch.cat([kernels.f32_linear(x[i : i + 1].contiguous(), weight) for i in range(rows)])
    assert torch.equal(alone, y)


def test_int8_linear_names_what_is_wrong(kernels):
    weight, scale = _quantized(8, 32)
    with pytest.raises(RuntimeError, match="x has 16 columns, expected 32"):
        kernels.int8_linear(torch.randn(2, 16), weight, scale)
    with pytest.raises(RuntimeError, match="w must be contiguous int8"):
        kernels.int8_linear(torch.randn(2, 32), weight.float(), scale)
    with pytest.raises(RuntimeError, match="w must be a contiguous 2-d float32 tensor"):
        kernels.f32_linear(torch.randn(2, 32), weight)


def test_rms_norm_and_silu_match_transformers(kernels):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.rand(576) + 0.5
    x = torch.randn(3, 576) * 4
    torch.testing.assert_close(kernels.rms_norm(x, norm.weight.data, 1e-5), norm(x).detach())
    gate_up = torch.randn(3, 2 * 1536)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_decode_attention_writes_the_cache_and_attends_over_each_rows_own_past(kernels):
    torch.manual_seed(2)
    batch, heads, kv_heads, head_dim, tokens = 3, 9, 3, 64, 40
    keys, values = torch.zeros(8, kv_heads, tokens, head_dim), torch.zeros(8, kv_heads, tokens, head_dim)
    keys[:batch, :, :20], values[:batch, :, :20] = torch.randn(2, batch, kv_heads, 20, head_dim)
    # Garbage past a row's position must not be read.
    keys[:batch, :, 25:], values[:batch, :, 25:] = torch.nan, torch.nan
    expected_keys, expected_values = keys.clone(), values.clone()
    positions = torch.tensor([5, 19, 12])
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim)
    angles = torch.randn(batch, head_dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    scale = head_dim**-0.5

    attended = kernels.decode_attention(qkv, cos, sin, keys, values, positions, heads, kv_heads, scale)

    expected = []
    for b, position in enumerate(positions.tolist()):
        q = _rotate(qkv[b, : heads * head_dim].view(heads, 1, head_dim), cos[b], sin[b])
        expected_keys[b, :, position] = _rotate(
            qkv[b, heads * head_dim : (heads + kv_heads) * head_dim].view(kv_heads, head_dim), cos[b], sin[b]
        )
        expected_values[b, :, position] = qkv[b, (heads + kv_heads) * head_dim :].view(kv_heads, head_dim)
        k = expected_keys[b, :, : position + 1].repeat_interleave(heads // kv_heads, dim=0)
        v = expected_values[b, :, : position + 1].repeat_interleave(heads // kv_heads, dim=0)
        expected.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).reshape(-1))
    torch.testing.assert_close(attended, torch.stack(expected))
    torch.testing.assert_close(keys[:, :, :25], expected_keys[:, :, :25])
    assert torch.equal(values[:, :, :25], expected_values[:, :, :25])
    assert keys[:batch, :, 25:].isnan().all() and values[:batch, :, 25:].isnan().all()

    with pytest.raises(RuntimeError, match="position 40 is outside the cache"):
        kernels.decode_attention(qkv, cos, sin, keys, values, torch.tensor([1, 2, 40]), heads, kv_heads, scale)


def test_rows_sharing_a_slot_attend_like_a_prompt_and_like_one_step_each(kernels):
    """A sequence's drafts checked at once: rows in one slot at consecutive positions see the
    cache before them and each other up to themselves, with the numbers of one step per row."""
    torch.manual_seed(3)
    heads, kv_heads, head_dim, tokens, start, length = 9, 3, 64, 40, 11, 5
    width = (heads + 2 * kv_heads) * head_dim
    cache = torch.zeros(4, kv_heads, tokens, head_dim), torch.zeros(4, kv_heads, tokens, head_dim)
    for part in cache:
        part[2, :, :start] = torch.randn(kv_heads, start, head_dim)
        part[2, :, start:] = torch.nan
    one_by_one = cache[0].clone(), cache[1].clone()
    qkv = torch.randn(length, width)
    angles = torch.randn(length, head_dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    positions, slots = torch.arange(start, start + length), torch.full((length,), 2)
    scale = head_dim**-0.5

    together = kernels.decode_attention(qkv, cos, sin, *cache, positions, heads, kv_heads, scale, slots)

    steps = [
        kernels.decode_attention(
            qkv[i : i + 1], cos[i : i + 1], sin[i : i + 1], *one_by_one, positions[i : i + 1], heads, kv_heads,
            scale, slots[i : i + 1],
        )
        for i in range(length)
    ]  # fmt: skip
    assert torch.equal(together, torch.cat(steps))
    assert torch.equal(cache[0][:, :, : start + length], one_by_one[0][:, :, : start + length])
    # Against torch's causal attention of the same rows after the cached opening.
    q = _rotate(qkv[:, : heads * head_dim].view(length, heads, head_dim).transpose(0, 1), cos, sin)
    k = cache[0][2, :, : start + length].repeat_interleave(heads // kv_heads, dim=0)
    v = cache[1][2, :, : start + length].repeat_interleave(heads // kv_heads, dim=0)
    mask = torch.arange(start + length)[None] <= positions[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(together, expected.transpose(0, 1).reshape(length, -1))
    with pytest.raises(RuntimeError, match="slot 4 is outside the cache"):
        kernels.decode_attention(qkv, cos, sin, *cache, positions, heads, kv_heads, scale, torch.full((length,), 4))


def test_without_a_compiler_int8_is_refused_with_the_reason(monkeypatch, tiny_checkpoint):
    from torch.utils import cpp_extension
    from transformers import AutoModelForCausalLM

    from inference.engine import DecoderWeights, EngineError

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'genapi_kernels': c++: not found")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with pytest.raises(EngineError, match=r"INFERENCE_QUANTIZE=int8: .* need a C\+\+ compiler .*c\+\+: not found"):
        DecoderWeights(model, quantize="int8")
    # fp32 does not need them: its batched steps go through torch's products instead.
    decoder = DecoderWeights(model, quantize="none")
    assert decoder.kernels is None
