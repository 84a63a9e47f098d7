"""The restorer on the CPU: exactness in fp32, batching and padding, reduced-precision numerics.

The CUDA-graph path cannot run here; what it shares with the CPU (the bucket plan and the padded
fixed-shape batches of StaticBatch) is tested on the CPU, and reaching it without CUDA is refused.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from streamgpen.errors import UserError
from streamgpen.models.gpen import GPEN, ModulatedConv2d
from streamgpen.models.weights import MODELS
from streamgpen.runtime.device import resolve_precision
from streamgpen.runtime.restorer import (
    Identity,
    Restorer,
    StaticBatch,
    bucket_for,
    bucket_sizes,
)

CPU = torch.device("cpu")
# Measured on the tiny fixture (4 seeds of uniform random faces): bf16 47.5-49.6 dB, fp16 67-68 dB;
# on a random GPEN-BFR-256 (seed 0, one face): bf16 48.6 dB, fp16 67.8 dB (fp16 takes 28 s there on
# the CPU's reference kernels, so CI checks that model in bf16 only).
BF16_MIN_PSNR = 40.0
FP16_MIN_PSNR = 55.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = (a.float() - b.float()).square().mean().item()
    return 10 * math.log10(4 / mse) if mse > 0 else math.inf


@pytest.fixture
def make_tiny(tiny_config, tiny_state_dict):
    """A fresh tiny GPEN each call: a Restorer casts its model in place."""

    def make() -> GPEN:
        model = GPEN.from_config(tiny_config).eval()
        model.load_state_dict(tiny_state_dict)
        return model

    return make


def faces(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


@torch.inference_mode()
def reference(model: GPEN, x: torch.Tensor) -> torch.Tensor:
    return model(x).clamp(-1, 1)


def test_cpu_defaults_are_eager_fp32(make_tiny):
    restorer = Restorer(make_tiny(), CPU)
    assert restorer.dtype == torch.float32
    assert restorer.cuda_graphs is False
    assert restorer.size == 64 and not restorer.is_identity
    # channels_last where it applies (4-D); the 5-D modulated weights stay as they are.
    params = list(restorer.model.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in params if p.dim() == 4)
    assert any(p.dim() == 5 for p in params)
    restorer.warmup()  # nothing to prepare on the eager path


def test_fp32_restorer_equals_model_forward(make_tiny):
    x = faces(5)
    out = Restorer(make_tiny(), CPU, batch_size=8)(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # channels_last sums in another order than the contiguous reference: measured 4e-6.
    assert torch.allclose(out, reference(make_tiny(), x), atol=2e-5)


def test_batches_of_any_size_equal_one_big_batch(make_tiny):
    x = faces(7)
    one_batch = Restorer(make_tiny(), CPU, batch_size=16)(x)
    in_threes = Restorer(make_tiny(), CPU, batch_size=3)(x)  # 3 + 3 + 1
    assert torch.allclose(in_threes, one_batch, atol=1e-5)
    empty = Restorer(make_tiny(), CPU)(faces(0))
    assert empty.shape == (0, 3, 64, 64)


def test_bucket_sizes_end_at_the_batch_size():
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(6, buckets=(4, 16)) == (4, 6)
    with pytest.raises(UserError):
        bucket_sizes(0)


def test_bucket_for_picks_the_smallest_that_fits():
    sizes = (1, 2, 4, 8, 12)
    assert [bucket_for(n, sizes) for n in range(1, 13)] == [1, 2, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]
    for n in (0, 13):
        with pytest.raises(ValueError, match="no bucket"):
            bucket_for(n, sizes)


@torch.inference_mode()
def test_static_batch_pads_and_slices(make_tiny):
    model = make_tiny()
    buffer = torch.zeros(4, 3, 64, 64)
    bucket = StaticBatch(lambda x: model(x).clamp(-1, 1), buffer)
    assert bucket.size == 4
    full, partial = faces(4, seed=1), faces(3, seed=2)
    assert torch.allclose(bucket(full), reference(model, full), atol=1e-5)
    # The 4th row still holds a face of the previous batch: it must not leak into the output.
    out = bucket(partial)
    assert out.shape == partial.shape
    assert torch.allclose(out, reference(model, partial), atol=1e-5)


def test_bf16_on_cpu_is_close_to_fp32(make_tiny):
    x = faces(4)
    out = Restorer(make_tiny(), CPU, precision="bf16")(x)
    assert out.dtype == torch.float32
    assert psnr(out, reference(make_tiny(), x)) >= BF16_MIN_PSNR


def test_fp16_on_cpu_is_close_to_fp32(make_tiny):
    # torch runs fp16 convolutions on the CPU through its slow reference kernels: one face.
    x = faces(1)
    out = Restorer(make_tiny(), CPU, precision="fp16")(x)
    assert torch.isfinite(out).all()
    assert psnr(out, reference(make_tiny(), x)) >= FP16_MIN_PSNR


def test_bf16_on_a_full_size_random_gpen_256_is_close_to_fp32():
    # The real architecture (8-layer mapping, 14 styled convolutions, 256 px) accumulates more
    # rounding than the tiny fixture; random weights keep the output far from the clamp.
    torch.manual_seed(0)
    model = GPEN.from_config(MODELS["GPEN-BFR-256"].config).eval()
    x = faces(1, size=256)
    expected = Restorer(copy.deepcopy(model), CPU, precision="fp32")(x)
    assert expected.std() > 0.3
    out = Restorer(model, CPU, precision="bf16")(x)
    assert psnr(out, expected) >= BF16_MIN_PSNR


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_survives_fp16_with_large_styles(demodulate):
    # Styles of ~1000: s**2 (demodulation) and x * s overflow fp16 unless the styles are
    # pre-normalised and the coefficients kept in fp32 (gpen.ModulatedConv2d).
    torch.manual_seed(0)
    conv = ModulatedConv2d(16, 8, 3, 32, demodulate=demodulate)
    with torch.no_grad():
        conv.modulation.bias.normal_(1000, 100)
    x, style = torch.randn(2, 16, 8, 8), torch.randn(2, 32)
    with torch.inference_mode():
        expected = conv(x, style)
        got = conv.half()(x.half(), style.half()).float()
    assert torch.isfinite(got).all()
    relative = (got - expected).norm() / expected.norm()
    assert relative.item() < 1e-2


def test_precision_and_device_are_checked(make_tiny):
    assert resolve_precision("auto", CPU) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    with pytest.raises(UserError, match="unknown precision"):
        Restorer(make_tiny(), CPU, precision="fp8")
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
        Restorer(make_tiny(), CPU, cuda_graphs=True)


def test_identity_returns_crops_unchanged():
    restorer = Restorer(Identity(), CPU)
    x = faces(3)
    assert restorer.is_identity and restorer.size == 512
    assert restorer(x) is x


def test_compiled_forward_on_padded_buckets_equals_eager(make_tiny):
    # torch.compile (inductor's C++ backend here, Triton on CUDA) on fixed-shape buckets: one
    # bucket of 2, so a single face is padded into it. About half a minute of compilation.
    x = faces(3, seed=3)
    restorer = Restorer(make_tiny(), CPU, batch_size=2, compile=True, buckets=(2,))
    restorer.warmup()
    out = restorer(x)  # 2 + 1 padded to 2
    assert torch.allclose(out, reference(make_tiny(), x), atol=1e-5)
