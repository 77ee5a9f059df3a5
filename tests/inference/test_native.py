"""The native decode kernels (inference/native): against torch's own arithmetic, and built at
install time only: serving loads a matching build or says what to run, and no lock left by a
killed build makes anything wait forever."""

import fcntl
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from inference import native
from inference.native.build import build

REPO = Path(__file__).resolve().parents[2]


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


def test_silu_and_its_exponential_are_as_accurate_as_torchs_over_the_whole_float_range(kernels):
    # The kernels' own vectorised e^x (kernels.cpp, exp_float) serves SiLU and attention's softmax.
    gate = torch.linspace(-87, 87, 400_001)
    ours = kernels.silu_mul(torch.cat([gate, torch.ones_like(gate)])[None].contiguous())[0].double()
    exact = gate.double() / (1 + torch.exp(-gate.double()))
    error = ((ours - exact).abs() / exact.abs().clamp(min=1e-38)).max().item() / torch.finfo(torch.float32).eps
    theirs = torch.nn.functional.silu(gate).double()
    error_torch = ((theirs - exact).abs() / exact.abs().clamp(min=1e-38)).max().item() / torch.finfo(torch.float32).eps
    assert error <= max(2.0, error_torch)


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


def _compiler_must_not_run(**kwargs):
    raise AssertionError("the compiler ran")


def test_serving_never_compiles_int8_refuses_and_fp32_falls_back(settings, tmp_path, monkeypatch, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from inference.engine import DecoderWeights, EngineError

    settings.INFERENCE_NATIVE_DIR = tmp_path / "never-built"
    monkeypatch.setattr(native, "_modules", {})
    monkeypatch.setattr(cpp_extension, "load", _compiler_must_not_run)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with pytest.raises(EngineError, match=r"INFERENCE_QUANTIZE=int8: .* not built .*\(no build\): run `make native`"):
        DecoderWeights(model, quantize="int8")
    # fp32 does not need them: its batched steps go through torch's products instead.
    decoder = DecoderWeights(model, quantize="none")
    assert decoder.kernels is None


def test_a_build_from_other_inputs_is_refused_with_what_differs(settings, tmp_path):
    directory = tmp_path / "native"
    shutil.copytree(settings.INFERENCE_NATIVE_DIR, directory)  # the build `make test` made
    stamp_path = directory / native.STAMP
    stamp = json.loads(stamp_path.read_text())
    assert native.problem(directory) is None
    assert native.load(directory).isa() == stamp["isa"]

    edited = tmp_path / "kernels.cpp"
    edited.write_text(native.SOURCE.read_text() + "// edited\n")
    with pytest.raises(native.NativeUnavailable, match=r"\(built from another kernels.cpp\): run `make native`"):
        native.load(directory, source=edited)

    stamp_path.write_text(json.dumps({**stamp, "torch": "2.0.0"}))
    expected = re.escape(f"(built for torch 2.0.0, this is torch {torch.__version__}): run `make native`")
    assert re.search(expected, native.problem(directory))
    with pytest.raises(native.NativeUnavailable, match=expected):
        native.load(directory)

    stamp_path.write_text(json.dumps(stamp))
    with (directory / stamp["library"]).open("ab") as library:
        library.write(b"\0")  # as a build cut short, or another build's library
    with pytest.raises(native.NativeUnavailable, match=r"changed after its build"):
        native.load(directory)


def test_the_start_up_check_says_what_is_missing_and_what_to_run(settings, tmp_path):
    from inference.checks import native_kernels_check

    assert native_kernels_check(None) == []  # the build `make test` made
    settings.INFERENCE_NATIVE_DIR = tmp_path
    [warning] = native_kernels_check(None)
    assert warning.id == "inference.W003"
    assert "decoding falls back to fp32 weights" in warning.msg and "run `make native`" in warning.msg
    settings.INFERENCE_QUANTIZE = "int8"
    [warning] = native_kernels_check(None)
    assert warning.id == "inference.W004" and "int8 will refuse to load models" in warning.msg


def test_the_start_up_check_is_cheap_it_imports_no_torch(settings):
    code = (
        "import sys; from inference import native; "
        f"assert native.problem({str(settings.INFERENCE_NATIVE_DIR)!r}) is None; print('torch' in sys.modules)"
    )
    assert _python(code, timeout=30).stdout.strip() == "False"


# A module that compiles in seconds, built the way kernels.cpp is.
TINY = """
#include <pybind11/pybind11.h>
#include <string>
std::string isa() { return "tiny"; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("isa", &isa); }
"""


@pytest.fixture
def tiny(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    directory = tmp_path / "build"
    directory.mkdir()
    return source, directory


def _python(code, *, timeout):
    """``code`` in a fresh Python, as another process would run it; past ``timeout`` it is
    killed and the test fails, where a regression would otherwise hang the suite."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def _build_code(source, directory):
    return (
        "from inference.native.build import build; "
        f"print(build({str(directory)!r}, source={str(source)!r}, wait=300).compiled)"
    )


def test_a_lock_file_left_by_a_killed_build_hangs_neither_the_build_nor_the_load(tiny):
    source, directory = tiny
    (directory / "lock").touch()  # torch's lock file, as a build killed while compiling leaves it

    built = _python(_build_code(source, directory), timeout=300)
    assert built.stdout.strip() == "True"
    assert "left behind by a build that was stopped" in built.stderr
    assert not (directory / "lock").exists()

    (directory / "lock").touch()
    load = f"from inference import native; print(native.load({str(directory)!r}, source={str(source)!r}).isa())"
    assert _python(load, timeout=60).stdout.strip() == "tiny"


def _held(path):
    try:
        with path.open() as file:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def test_a_second_build_waits_for_the_first_and_finds_it_done(tiny, monkeypatch):
    source, directory = tiny
    first = subprocess.Popen(
        [sys.executable, "-c", _build_code(source, directory)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not _held(directory / native.LOCK):  # the first one is compiling
            assert first.poll() is None and time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.02)
        monkeypatch.setattr(cpp_extension, "load", _compiler_must_not_run)

        second = build(directory, source=source, wait=300)

        assert not second.compiled and second.isa == "tiny"
        assert first.wait(timeout=60) == 0 and first.stdout.read().strip() == "True"
    finally:
        first.kill()
        first.wait()
    assert native.load(directory, source=source).isa() == "tiny"


def test_a_lock_held_too_long_is_named_and_a_killed_holder_leaves_none(tiny, monkeypatch):
    source, directory = tiny
    hold = "import sys, time; from inference import native\n"
    hold += "with native.build_lock(sys.argv[1], shared=False, wait=0): print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = re.escape(f"process {holder.pid} (it holds {directory / native.LOCK}); gave up waiting after 1 s")
        with pytest.raises(native.NativeUnavailable, match=lock):
            build(directory, source=source, wait=1)
        monkeypatch.setattr(native, "LOAD_WAIT_SECONDS", 1)
        with pytest.raises(native.NativeUnavailable, match=lock):
            native.load(directory, source=source)
    finally:
        holder.kill()  # as a build stopped mid-compile
        holder.wait()

    # The kernel dropped the dead process's lock: the next build goes straight on (to the compiler).
    def compiler(**kwargs):
        raise RuntimeError("c++: the compiler ran")

    monkeypatch.setattr(cpp_extension, "load", compiler)
    started = time.monotonic()
    with pytest.raises(native.NativeUnavailable, match="the compiler ran"):
        build(directory, source=source, wait=30)
    assert time.monotonic() - started < 5
