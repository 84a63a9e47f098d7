"""The background upsampler: Real-ESRGAN-layout networks through spandrel, tiling, geometry, the
resize default, and refusing files that are not super-resolution weights.

The networks are seeded random state dicts in the key layout of Real-ESRGAN's released files
(basicsr's RRDBNet and SRVGGNetCompact names), with fewer blocks so that a CPU runs them in
milliseconds; spandrel recognises them by the same keys as the real ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from spandrel import ModelLoader
from torch import nn

from streamgpen.errors import UserError
from streamgpen.models import weights
from streamgpen.runtime.upsampler import (
    NetworkUpsampler,
    ResizeUpsampler,
    build_upsampler,
    load_network,
    tile_spans,
    upsampler_problem,
)

HEIGHT, WIDTH = 40, 48


def _conv(state: dict, generator: torch.Generator, name: str, out_ch: int, in_ch: int) -> None:
    # PyTorch's default Conv2d init: uniform in +-1/sqrt(fan_in), for weight and bias.
    bound = 1 / math.sqrt(in_ch * 9)
    state[f"{name}.weight"] = (torch.rand(out_ch, in_ch, 3, 3, generator=generator) * 2 - 1) * bound
    state[f"{name}.bias"] = (torch.rand(out_ch, generator=generator) * 2 - 1) * bound


def rrdbnet_state(scale: int, *, num_block: int = 1, num_feat: int = 8, seed: int = 0) -> dict:
    """basicsr's RRDBNet keys (RealESRGAN_x4plus / x2plus), num_grow_ch 32 as released.

    x2 folds 2x2 pixel blocks into 12 input channels and upsamples x4, as RealESRGAN_x2plus does.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    grow = 32
    _conv(state, generator, "conv_first", num_feat, 3 * {2: 4, 4: 1}[scale])
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                out_ch = num_feat if conv == 5 else grow
                name = f"body.{block}.rdb{rdb}.conv{conv}"
                _conv(state, generator, name, out_ch, num_feat + (conv - 1) * grow)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        _conv(state, generator, name, num_feat, num_feat)
    _conv(state, generator, "conv_last", 3, num_feat)
    # Default init gives outputs of std 0.024 around 0, half of them clamped away: centre them on
    # 0.5 with std ~0.1 so that every output pixel counts in the comparisons below.
    state["conv_last.weight"] *= 4
    state["conv_last.bias"] += 0.5
    return state


def compact_state(scale: int = 4, *, num_conv: int = 4, num_feat: int = 16, seed: int = 0) -> dict:
    """SRVGGNetCompact's keys (realesr-general-x4v3 has num_feat 64, num_conv 32): conv, PReLU
    pairs in ``body``, the last conv giving 3*scale^2 channels for the pixel shuffle."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, generator, "body.0", num_feat, 3)
    for i in range(num_conv + 1):
        state[f"body.{2 * i + 1}.weight"] = torch.full((num_feat,), 0.25)  # PReLU's init
        if i < num_conv:
            _conv(state, generator, f"body.{2 * i + 2}", num_feat, num_feat)
    _conv(state, generator, f"body.{2 * num_conv + 2}", 3 * scale * scale, num_feat)
    return state


NETWORKS = {
    "x2": lambda: rrdbnet_state(2),
    "x4": lambda: rrdbnet_state(4),
    "compact": lambda: compact_state(4),
}
# The registered model each test network stands in for.
REGISTERED = {
    "x2": "RealESRGAN_x2plus",
    "x4": "RealESRGAN_x4plus",
    "compact": "realesr-general-x4v3",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each test network saved with torch.save, as a plain state dict."""
    directory = tmp_path_factory.mktemp("sr")
    paths = {}
    for key, make in NETWORKS.items():
        paths[key] = directory / f"{key}.pth"
        torch.save(make(), paths[key])
    return paths


def frames(batch: int = 1, height: int = HEIGHT, width: int = WIDTH, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


def network(path: Path, *, tile: int = 0, overlap: int = 0) -> NetworkUpsampler:
    return build_upsampler(
        path,
        device="cpu",
        dtype=torch.float32,
        weights_dir=path.parent,
        tile=tile,
        tile_overlap=overlap,
    )


def network_from_state(state: dict, *, tile: int = 0, overlap: int = 0) -> NetworkUpsampler:
    descriptor = ModelLoader().load_from_state_dict(state)
    return NetworkUpsampler(descriptor, "cpu", dtype=torch.float32, tile=tile, tile_overlap=overlap)


@pytest.mark.parametrize("key", list(NETWORKS))
def test_loads_by_path_and_by_registered_name(checkpoints, tmp_path, key):
    by_path = network(checkpoints[key])
    spec = weights.get_spec(REGISTERED[key])
    (tmp_path / spec.filename).write_bytes(checkpoints[key].read_bytes())
    by_name = build_upsampler(
        spec.name, device="cpu", dtype=torch.float16, weights_dir=tmp_path, tile=0
    )
    assert isinstance(by_name, NetworkUpsampler)
    assert by_path.native_scale == by_name.native_scale == spec.scale
    assert type(by_name.descriptor.model).__name__ == spec.network_name
    # fp16 asked for on the CPU runs in float32.
    assert by_name.dtype == torch.float32
    x = frames()
    assert torch.equal(by_path(x, 2), by_name(x, 2))


# 41x47 is no multiple of x2plus's 4 (spandrel pads it) and rounds at 1.5: 61.5 -> 62, 70.5 ->
# 70 (Python's round, half to even). Scale 2 is native for x2 and a shrink for x4, 1.5 a shrink
# by a non-integer factor for both, 3 an enlargement past x2's native scale.
@pytest.mark.parametrize("key", ["x2", "x4"])
@pytest.mark.parametrize(("size", "scale"), [((HEIGHT, WIDTH), 2), ((41, 47), 1.5), ((41, 47), 3)])
def test_output_size_is_rounded_input_size_times_scale(checkpoints, key, size, scale):
    x = frames(1, *size)
    out = network(checkpoints[key])(x, scale)
    assert out.shape == (1, 3, round(size[0] * scale), round(size[1] * scale))
    assert out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1


def test_scale_one_is_the_identity_and_below_one_refused(checkpoints):
    x = frames()
    for up in (ResizeUpsampler(), network(checkpoints["x4"])):
        assert up(x, 1) is x
        with pytest.raises(UserError, match="--upscale must be at least 1"):
            up(x, 0.5)


def test_x4_network_at_scale_2_is_its_x4_output_averaged():
    # The x4 output shrunk to x2 by area is exactly the mean of each 2x2 block of it.
    up = network_from_state(rrdbnet_state(4))
    x = frames()
    native = up(x, 4)
    expected = native.unflatten(2, (HEIGHT * 2, 2)).unflatten(4, (WIDTH * 2, 2)).mean((3, 5))
    assert (up(x, 2) - expected).abs().max() < 1e-6


# Tiles cover the frame, cores disjoint, each read with its overlap where the frame has it.
def test_tile_spans_cover_the_frame():
    spans = tile_spans(40, 16, 8)
    assert spans == [(0, 16, 0, 24), (16, 32, 8, 40), (32, 40, 24, 40)]
    assert tile_spans(40, 0, 8) == tile_spans(40, 64, 8) == [(0, 40, 0, 40)]


# Overlap at least the receptive-field radius makes every output pixel see all the input it
# depends on, so tiled equals untiled up to float rounding. Radii measured as the extent of the
# nonzero gradient of one input pixel's outputs with respect to the input: RRDBNet x4 with 1 block
# 19 px (17 convolutions at input resolution, the x4 tail's at fractions of a pixel), x2 38 px
# (the same convolutions at half resolution, after the 2x2 fold), SRVGGNetCompact with 4 convs
# 6 px. Tile 16 on 48x40 gives 3x3 tiles; x2's tile 30 and overlap 38 are rounded up to 32 and 40
# (its multiple of 4), on 96x80 so that its 40 px overlap still leaves tiles that read part of the
# frame. Measured max abs differences at these overlaps: 2.4e-7 (x2), 1.2e-7 (x4), 0 (compact).
# Influence decays fast inside the field (x4: 4.8e-5 at overlap 4), so less can pass too; the full
# radius makes the bound hold by construction, not by these weights' luck.
# At overlap 2 (x2: rounded up to 4) the seams differ by 0.051 (x2), 0.014 (x4) and 0.0034
# (compact): the 1e-3 bound catches a tiler that dropped or misplaced its overlap.
TILED = {
    "x2": dict(tile=30, overlap=38, size=(80, 96)),
    "x4": dict(tile=16, overlap=19, size=(HEIGHT, WIDTH)),
    "compact": dict(tile=16, overlap=6, size=(HEIGHT, WIDTH)),
}


@pytest.mark.parametrize("key", list(NETWORKS))
def test_tiled_equals_untiled_when_the_overlap_covers_the_receptive_field(checkpoints, key):
    case = TILED[key]
    x = frames(1, *case["size"])
    untiled = network(checkpoints[key])(x, 2)
    tiled = network(checkpoints[key], tile=case["tile"], overlap=case["overlap"])(x, 2)
    assert (tiled - untiled).abs().max() < 1e-3
    seams = network(checkpoints[key], tile=case["tile"], overlap=2)(x, 2)
    assert (seams - untiled).abs().max() > 1e-3


@pytest.mark.parametrize("key", ["x2", "compact"])
def test_batch_equals_frames_one_by_one(checkpoints, key):
    up = network(checkpoints[key], tile=24, overlap=8)
    x = frames(3)
    together = up(x, 2)
    alone = torch.cat([up(x[i : i + 1], 2) for i in range(3)])
    assert (together - alone).abs().max() < 1e-5


def test_output_keeps_the_frames_dtype(checkpoints):
    up = network(checkpoints["compact"], tile=16, overlap=8)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = up(frames().to(dtype), 1.5)
        assert out.dtype == dtype and out.shape == (1, 3, 60, 72)


def test_resize_keeps_a_constant_image_constant_and_in_range():
    up = ResizeUpsampler()
    flat = torch.full((1, 3, HEIGHT, WIDTH), 0.3)
    # Bicubic weights sum to 1: measured max deviation 1.8e-7 (float32 rounding).
    assert (up(flat, 2.5) - 0.3).abs().max() < 1e-6
    noise = frames(2)
    out = up(noise, 2)
    assert out.shape == (2, 3, 80, 96)
    # Unclamped, bicubic overshoots on noise: measured range -0.19..1.18 for this input.
    raw = torch.nn.functional.interpolate(noise, size=(80, 96), mode="bicubic")
    assert raw.min() < -0.1 and raw.max() > 1.1
    assert out.min() == 0 and out.max() == 1


def test_upsampler_problem_names_the_difference():
    x2, x4 = rrdbnet_state(2), rrdbnet_state(4)
    spec_x4 = weights.get_spec("RealESRGAN_x4plus")
    assert upsampler_problem(spec_x4, x2) == "a x2 RRDBNet, expected x4"
    assert upsampler_problem(spec_x4, x4) is None
    assert upsampler_problem(weights.get_spec("realesr-general-x4v3"), compact_state()) is None
    assert "SRVGGNetCompact network, expected RRDBNet" in upsampler_problem(
        spec_x4, compact_state()
    )


def test_wrong_network_under_a_registered_name_is_refused(checkpoints, tmp_path):
    spec = weights.get_spec("RealESRGAN_x4plus")
    (tmp_path / spec.filename).write_bytes(checkpoints["x2"].read_bytes())
    with pytest.raises(UserError, match=r"not a RealESRGAN_x4plus checkpoint \(a x2 RRDBNet"):
        build_upsampler(spec.name, device="cpu", dtype=torch.float32, weights_dir=tmp_path, tile=0)
    # The download check (weights.check) refuses it the same way.
    with pytest.raises(UserError, match="expected x4"):
        weights.check(spec, tmp_path / spec.filename)


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this would call _touch: the code a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pth"
    torch.save({"conv_first.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    with pytest.raises(UserError, match="pickled code") as error:
        network(path)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    module_file = tmp_path / "module.pth"
    torch.save({"body": nn.Conv2d(3, 3, 3)}, module_file)
    with pytest.raises(UserError, match=r"pickled code \(torch\.nn\.modules"):
        network(module_file)


def test_non_sr_files_are_refused_in_one_line(shared_dir, tmp_path):
    with pytest.raises(UserError, match="recognises no architecture") as error:
        network(shared_dir / "weights" / "detection_mobilenet0.25_Final.pth")
    assert "\n" not in str(error.value)
    # A 1x SRVGGNetCompact is a restoration model to spandrel: it would not enlarge anything.
    restoration = tmp_path / "x1.pth"
    torch.save(compact_state(1), restoration)
    with pytest.raises(UserError, match=r"Restoration model \(x1\), not single-image") as error:
        load_network(restoration)
    assert "\n" not in str(error.value)


def test_registered_name_without_a_directory_uses_the_default_one(
    checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path))
    spec = weights.get_spec("realesr-general-x4v3")
    (tmp_path / spec.filename).write_bytes(checkpoints["compact"].read_bytes())
    up = build_upsampler(spec.name, device="cpu", dtype=torch.float32, weights_dir=None, tile=0)
    assert up.native_scale == 4


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(UserError) as error:
        build_upsampler(
            "GPEN-BFR-512", device="cpu", dtype=torch.float32, weights_dir=tmp_path, tile=0
        )
    message = str(error.value)
    for name in ("none", "RealESRGAN_x2plus", "RealESRGAN_x4plus", "realesr-general-x4v3"):
        assert name in message
    assert isinstance(
        build_upsampler("none", device="cpu", dtype=torch.float32, weights_dir=tmp_path, tile=0),
        ResizeUpsampler,
    )


@pytest.mark.parametrize("container", ["params_ema", "params"])
def test_basicsr_release_containers_load(tmp_path, container):
    # Real-ESRGAN's released files are saved by basicsr as {'params_ema': state_dict} (x4plus,
    # x2plus) or {'params': state_dict} (realesr-general-x4v3).
    path = tmp_path / "released.pth"
    torch.save({container: rrdbnet_state(4)}, path)
    assert network(path).native_scale == 4
    assert (
        weights.structure_problem(
            weights.get_spec("RealESRGAN_x4plus"), weights.load_state_dict(path)
        )
        is None
    )
