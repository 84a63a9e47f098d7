"""Face-parsing paste masks: loading facexlib's ParseNet and BiSeNet, class selection, feathering.

The networks are facexlib's real architectures with seeded random weights (the released files
cannot be downloaded here); every forward runs the real network on the CPU. A ParseNet forward at
its 512 input takes ~7 s here, a BiSeNet one ~0.35 s: the batch behaviour is measured on BiSeNet,
ParseNet runs once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from facexlib.parsing.bisenet import BiSeNet
from facexlib.parsing.parsenet import ParseNet

from streamgpen.errors import UserError
from streamgpen.faces import parse
from streamgpen.faces.align import MASK_INSET
from streamgpen.models import weights

MOBILENET = "detection_mobilenet0.25_Final.pth"
# Class indices of each network that must not be pasted (background, hat, cloth), read off
# GPEN's face_parsing.py class list for ParseNet and facexlib's inference_parsing.py for BiSeNet.
DROPPED = {"parsenet": {0, 14, 18}, "bisenet": {0, 16, 18}}
# Indices of some classes in each network's output (the same lists).
CLASS = {
    "parsenet": {"skin": 1, "hair": 13, "eye_g": 3, "neck": 17, "hat": 14, "cloth": 18},
    "bisenet": {"skin": 1, "hair": 17, "eye_g": 6, "neck": 14, "hat": 18, "cloth": 16},
}


def random_network(network_name: str) -> torch.nn.Module:
    """facexlib's network as init_parsing_model builds it, its weights seeded random."""
    torch.manual_seed(0)
    if network_name == "parsenet":
        return ParseNet(in_size=512, out_size=512, parsing_ch=19)
    return BiSeNet(num_class=19)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A seeded random checkpoint of each network, saved under its registry file name."""
    directory = tmp_path_factory.mktemp("parse-weights")
    paths = {}
    for network_name in parse.NETWORKS:
        path = directory / weights.get_spec(network_name).filename
        torch.save(random_network(network_name).state_dict(), path)
        paths[network_name] = path
    return paths


@pytest.fixture(scope="module")
def bisenet(checkpoints) -> parse.FaceParser:
    return parse.build_parser(
        str(checkpoints["bisenet"]), device="cpu", dtype=torch.float32, progress=False
    )


def random_crops(n: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


class ForwardLog:
    """Records every forward of a module (a hook on the real module): count and inputs."""

    def __init__(self, module: torch.nn.Module):
        self.inputs: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.inputs.append(args[0].clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def assert_exact_zero_border(masks: torch.Tensor) -> None:
    size = masks.shape[-1]
    inset = round(MASK_INSET * size)
    assert inset > 0
    for border in (
        masks[..., :inset, :],
        masks[..., -inset:, :],
        masks[..., :, :inset],
        masks[..., :, -inset:],
    ):
        assert torch.count_nonzero(border) == 0
    # Not vacuous: the mask is nonzero on the first lines inside the inset.
    inner = masks[..., inset : size - inset, inset : size - inset]
    first_lines = torch.cat([inner[..., 0, :], inner[..., -1, :], inner[..., 0], inner[..., -1]])
    assert first_lines.amax() > 0


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("network_name", ["parsenet", "bisenet"])
def test_a_parser_loads_by_path_and_by_name(checkpoints, network_name):
    path = checkpoints[network_name]
    saved = torch.load(path, weights_only=True)
    by_path = parse.build_parser(str(path), device="cpu", dtype=torch.float32, progress=False)
    by_name = parse.build_parser(
        network_name, device="cpu", dtype=torch.float32, weights_dir=path.parent, progress=False
    )
    for parser in (by_path, by_name):
        assert parser.kind.name == network_name
        loaded = parser.network.state_dict()
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_parser_problem_accepts_each_network_and_refuses_the_other(checkpoints):
    dicts = {n: torch.load(p, weights_only=True) for n, p in checkpoints.items()}
    for name, state_dict in dicts.items():
        spec = weights.get_spec(name)
        assert parse.parser_problem(spec, state_dict) is None
        assert weights.structure_problem(spec, state_dict) is None
    problem = parse.parser_problem(weights.get_spec("parsenet"), dicts["bisenet"])
    assert problem is not None and "missing keys" in problem and "\n" not in problem


def test_the_cpu_runs_float32_whatever_the_dtype(checkpoints):
    parser = parse.build_parser(
        str(checkpoints["bisenet"]), device="cpu", dtype=torch.float16, progress=False
    )
    assert parser.dtype == torch.float32
    assert {p.dtype for p in parser.network.parameters()} == {torch.float32}


class Payload:
    """Pickles as a call to open(marker, 'w'): loading it unsafely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_code_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / weights.get_spec("parsenet").filename
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    for name in (str(path), "parsenet"):
        with pytest.raises(UserError, match="refused: it contains pickled code"):
            parse.build_parser(
                name, device="cpu", dtype=torch.float32, weights_dir=tmp_path, progress=False
            )
    assert not marker.exists()


def test_the_retinaface_file_is_not_a_parser(shared_dir, tmp_path):
    path = tmp_path / weights.get_spec("parsenet").filename
    shutil.copy(shared_dir / "weights" / MOBILENET, path)
    with pytest.raises(UserError) as by_name:
        parse.build_parser(
            "parsenet", device="cpu", dtype=torch.float32, weights_dir=tmp_path, progress=False
        )
    message = str(by_name.value)
    assert message.startswith(f"{path}: not a parsenet checkpoint (") and "\n" not in message
    with pytest.raises(UserError) as by_path:
        parse.build_parser(str(path), device="cpu", dtype=torch.float32, progress=False)
    message = str(by_path.value)
    assert message.startswith(f"{path}: not a face parsing checkpoint (as parsenet: ")
    assert "; as bisenet: " in message and "\n" not in message


def test_an_unknown_parser_name_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^unknown face parser 'segformer': use parsenet or "):
        parse.build_parser("segformer", device="cpu", dtype=torch.float32, weights_dir=tmp_path)


# --- class selection and feathering ---------------------------------------------------------


@pytest.mark.parametrize("network_name", ["parsenet", "bisenet"])
def test_background_hat_and_cloth_are_dropped_the_face_hair_glasses_and_neck_kept(network_name):
    kind = parse.NETWORKS[network_name]
    kept = torch.tensor(kind.kept())
    every_class = torch.arange(19).view(1, 1, 19)  # [1, 1, 19]: one pixel per class
    mask = parse.kept_pixels(every_class, kept)
    assert mask.shape == (1, 1, 1, 19) and mask.dtype == torch.float32
    assert {i for i in range(19) if mask[0, 0, 0, i] == 0} == DROPPED[network_name]
    # A hand-made label map: a hat on top, cloth below, hair, skin, glasses and neck between.
    index = CLASS[network_name]
    labels = torch.zeros(1, 8, 8, dtype=torch.long)  # background everywhere else
    labels[0, 0, 2:6] = index["hat"]
    labels[0, 1, 2:6] = index["hair"]
    labels[0, 2:4, 2:6] = index["skin"]
    labels[0, 3, 3:5] = index["eye_g"]
    labels[0, 4:6, 3:5] = index["neck"]
    labels[0, 6:, :] = index["cloth"]
    mask = parse.kept_pixels(labels, kept)[0, 0]
    expected = torch.zeros(8, 8)
    expected[1, 2:6] = expected[2:4, 2:6] = expected[4:6, 3:5] = 1
    assert torch.equal(mask, expected)


def test_feather_is_zero_at_the_border_one_inside_and_smooth():
    size = 512
    kept = torch.zeros(2, 1, size, size)
    kept[0] = 1  # all face: the mask is the border's feather alone
    kept[1, :, 100:400, 150:350] = 1  # a face-shaped block
    mask = parse.feather(kept, size)
    assert mask.shape == (2, 1, size, size) and mask.dtype == torch.float32
    assert mask.min() >= 0 and mask.max() <= 1
    assert_exact_zero_border(mask)
    # Far from every edge the mask is the kept map (the blur's weights sum to 1): 1 and 0.
    assert torch.allclose(mask[0, 0, 100:412, 100:412], torch.ones(312, 312), atol=1e-6)
    assert torch.allclose(mask[1, 0, 200:300, 200:300], torch.ones(100, 100), atol=1e-6)
    assert mask[1, 0, 450:].abs().max() == 0
    # Smooth: a Gaussian of sigma 4 * sqrt(2) = 5.66 px at 512 turns a 0/1 step into a ramp whose
    # steepest pixel-to-pixel change is its kernel's peak, 1 / (sqrt(2 pi) 5.66) = 0.0705
    # (measured 0.0705 on both axes); unfeathered it would be 1.
    assert mask.diff(dim=-1).abs().max() < 0.071
    assert mask.diff(dim=-2).abs().max() < 0.071


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_feather_keeps_the_exact_zero_border_at_every_crop_size(size):
    mask = parse.feather(torch.ones(1, 1, 512, 512), size)
    assert mask.shape == (1, 1, size, size)
    assert_exact_zero_border(mask)
    assert mask[0, 0, size // 2, size // 2] == pytest.approx(1, abs=1e-6)


# --- masks() through the real networks ------------------------------------------------------


def test_bisenet_masks_one_forward_per_batch_equal_to_one_by_one(bisenet):
    crops = random_crops(3, 512)
    with ForwardLog(bisenet.network) as log:
        masks = bisenet.masks(crops)
    assert len(log.inputs) == 1 and log.inputs[0].shape == (3, 3, 512, 512)
    # BiSeNet takes RGB in [0, 1] normalised with the ImageNet mean and std.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(log.inputs[0], ((crops + 1) / 2 - mean) / std, atol=1e-5)
    assert masks.shape == (3, 1, 512, 512) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1
    assert_exact_zero_border(masks)
    # Not the box: the random network calls ~half the pixels background (measured mean 0.34).
    assert 0.1 < masks.mean() < 0.9
    one_by_one = torch.cat([bisenet.masks(crops[i : i + 1]) for i in range(3)])
    assert torch.allclose(masks, one_by_one, atol=1e-5)


def test_masks_are_split_into_batches_of_at_most_batch_size(checkpoints):
    parser = parse.build_parser(
        str(checkpoints["bisenet"]), device="cpu", dtype=torch.float32, batch_size=2
    )
    crops = random_crops(3, 128)
    with ForwardLog(parser.network) as log:
        masks = parser.masks(crops)
    assert [x.shape[0] for x in log.inputs] == [2, 1]
    assert masks.shape == (3, 1, 128, 128)
    assert_exact_zero_border(masks)


def test_no_faces_no_forward(bisenet):
    with ForwardLog(bisenet.network) as log:
        masks = bisenet.masks(torch.zeros(0, 3, 256, 256))
    assert masks.shape == (0, 1, 256, 256) and not log.inputs


def test_parsenet_masks_a_256_crop_through_its_512_input(checkpoints):
    parser = parse.build_parser(
        str(checkpoints["parsenet"]), device="cpu", dtype=torch.float32, progress=False
    )
    crops = random_crops(1, 256)
    with ForwardLog(parser.network) as log:
        masks = parser.masks(crops)
    # ParseNet takes RGB in [-1, 1] as it is, resized to 512.
    assert len(log.inputs) == 1
    expected = F.interpolate(crops, (512, 512), mode="bilinear", align_corners=False)
    assert torch.allclose(log.inputs[0], expected.clamp(-1, 1), atol=1e-6)
    assert masks.shape == (1, 1, 256, 256) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1
    assert_exact_zero_border(masks)


def test_mask_smoother_averages_each_track_and_forgets_absent_ones():
    from streamgpen.faces.parse import MaskSmoother

    smoother = MaskSmoother(keep=0.5)
    first = parse.feather(torch.ones(2, 1, 64, 64), 64)
    out = smoother(first, [7, 8])
    assert torch.equal(out, first)  # new tracks start from their own masks
    second = torch.zeros(2, 1, 64, 64)
    out = smoother(second, [7, 9])  # 7 continues, 9 is new, 8 is gone
    assert torch.allclose(out[0], first[0] * 0.5) and torch.equal(out[1], second[1])
    out = smoother(first[:1], [8])  # 8 was forgotten: its own mask again
    assert torch.equal(out, first[:1])
    border = round(MASK_INSET * 64)
    assert (out[..., :border, :] == 0).all()  # a convex mix of masks that are 0 there
    smoother.reset()
    assert torch.equal(smoother(second[:1], [8]), second[:1])
