"""The GPEN generator: official checkpoint layout, numerical equivalence, modulated conv forms."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamgpen.models.gpen import (
    GPEN,
    GPENConfig,
    ModulatedConv2d,
    infer_config,
    shape_mismatch,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpen"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    assert path.exists(), f"missing shared fixture {path}: the tests need ../shared beside the repo"
    return path


@pytest.mark.parametrize("name", ["GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024"])
def test_official_manifest_loads_strictly(name):
    manifest = json.loads(fixture(f"manifest_{name}.json").read_text())
    config = GPENConfig(**manifest["config"])
    with torch.device("meta"):
        model = GPEN.from_config(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest["keys"]
    # strict load of a dict with exactly the official keys and shapes
    state = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    model.load_state_dict(state, strict=True, assign=True)
    # the manifest counts every stored tensor, the blur-kernel buffers included
    assert sum(t.numel() for t in model.state_dict().values()) == manifest["n_params"]
    assert infer_config(state) == config


def test_tiny_fixture_matches_official_forward():
    state = torch.load(fixture("tiny_state_dict.pt"), map_location="cpu", weights_only=True)
    io = torch.load(fixture("tiny_io.pt"), map_location="cpu", weights_only=True)
    config = infer_config(state)
    assert config == GPENConfig(**io["config"])
    model = GPEN.from_config(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(io["input"])
    assert out.shape == io["output"].shape
    assert (out - io["output"]).abs().max().item() <= 1e-4


def test_infer_config_rejects_other_networks():
    with pytest.raises(ValueError, match="not a GPEN"):
        infer_config({"conv.weight": torch.zeros(3)})
    state = GPEN(32, style_dim=16, n_mlp=2, narrow=0.125).state_dict()
    state["generator.conv1.conv.weight"] = torch.zeros(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"generator\.conv1\.conv\.weight"):
        infer_config(state)
    assert shape_mismatch(GPENConfig(64), state) is not None


def grouped_modulated_conv(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor):
    """The official formulation: one modulated weight per sample, run as a grouped convolution."""
    batch, in_channel, height, width = x.shape
    k, out_channel = conv.kernel_size, conv.out_channel
    s = conv.modulation(style).view(batch, 1, in_channel, 1, 1)
    weight = conv.scale * conv.weight * s
    if conv.demodulate:
        demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
        weight = weight * demod.view(batch, out_channel, 1, 1, 1)
    x = x.reshape(1, batch * in_channel, height, width)
    if conv.upsample:
        weight = weight.transpose(1, 2).reshape(batch * in_channel, out_channel, k, k)
        out = F.conv_transpose2d(x, weight, stride=2, groups=batch)
        return conv.blur(out.view(batch, out_channel, *out.shape[2:]))
    weight = weight.view(batch * out_channel, in_channel, k, k)
    out = F.conv2d(x, weight, padding=conv.padding, groups=batch)
    return out.view(batch, out_channel, *out.shape[2:])


@pytest.mark.parametrize(
    ("kernel_size", "demodulate", "upsample"),
    [(3, True, False), (3, True, True), (1, False, False)],
)
def test_batch_friendly_modulated_conv_equals_grouped(kernel_size, demodulate, upsample):
    torch.manual_seed(0)
    conv = ModulatedConv2d(12, 10, kernel_size, 32, demodulate=demodulate, upsample=upsample)
    with torch.no_grad():
        conv.modulation.bias.normal_()
        x = torch.randn(5, 12, 9, 9)
        style = torch.randn(5, 32)
        ours = conv(x, style)
        reference = grouped_modulated_conv(conv, x, style)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)


def test_faces_in_a_batch_are_independent():
    torch.manual_seed(1)
    model = GPEN(32, style_dim=16, n_mlp=2, narrow=0.125).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
