"""Temporal stabilisation (``--temporal ema|flow``, faces/temporal.py): GPEN's halves, the
per-track latent average and the flow blend, their reset rules, and the command line on the sample.

Faces are the sample's own, aligned (real texture for the change probe and the optical flow);
the network is the tiny seeded GPEN fixture. The figures on the sample with a GPEN-BFR-256 are
benchmarks/temporal.py's.
"""

from __future__ import annotations

import copy
import itertools

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_video import SAMPLE, decoded_frames, sample_head
from typer.testing import CliRunner

from streamgpen.apps.evaluate import evaluate_video
from streamgpen.cli.app import app
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.faces import temporal
from streamgpen.faces.temporal import FlowSmoother, LatentSmoother, crop_change, probes
from streamgpen.faces.types import FaceBatch
from streamgpen.models.gpen import GPEN
from streamgpen.models.weights import MODELS
from streamgpen.runtime.restorer import Identity, Restorer

CPU = torch.device("cpu")
# The sample's first frames through the command line: one full detection, then tracking.
FRAMES = 8


@pytest.fixture(scope="module")
def sample_faces(detector) -> torch.Tensor:
    """The sample's first frame's faces aligned at 256, [13, 3, 256, 256] RGB in [-1, 1]."""
    with av.open(str(SAMPLE)) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    frame = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    enhancer = Enhancer(
        restorer=Restorer(Identity(256), CPU), face_detector=detector, device=CPU, mask="box"
    )
    batch = enhancer.align(frame, enhancer.detect(frame))
    assert len(batch.faces) >= 10
    return batch.crops


def at(crops: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(crops, size=(size, size), mode="area")


def shifted(crops: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """crops [N, 3, S, S] moved by (dx, dy) pixels (content at p lands at p + d), border kept."""
    size = crops.shape[-1]
    theta = torch.tensor([[1, 0, -2 * dx / size], [0, 1, -2 * dy / size]], dtype=crops.dtype)
    grid = F.affine_grid(theta.expand(len(crops), 2, 3), list(crops.shape), align_corners=False)
    return F.grid_sample(crops, grid, padding_mode="border", align_corners=False)


@pytest.fixture
def tiny(tiny_config, tiny_state_dict) -> GPEN:
    model = GPEN.from_config(tiny_config).eval()
    model.load_state_dict(tiny_state_dict)
    return model


@pytest.fixture
def restorer(tiny) -> Restorer:
    return Restorer(tiny, CPU, batch_size=4, halves=True)


def run_ema(restorer: Restorer, smoother: LatentSmoother, frames, keys) -> list[torch.Tensor]:
    """Each call's crops [n, 3, S, S] restored with ``smoother``'s mixing; ``keys`` per call."""
    return [restorer(c, mix=smoother.mixer(k, c)) for c, k in zip(frames, keys, strict=True)]


# --- GPEN in two halves ------------------------------------------------------------------------


@torch.inference_mode()
def test_decode_of_encode_is_forward_bit_for_bit(tiny, sample_faces):
    torch.manual_seed(0)  # GPEN-BFR-256's architecture, random weights
    gpen256 = GPEN.from_config(MODELS["GPEN-BFR-256"].config).eval()
    for model, crops in ((tiny, at(sample_faces[:3], 64)), (gpen256, sample_faces[:1])):
        z, features = model.encode(crops)
        assert z.dtype == torch.float32 and z.shape == (len(crops), model.config.style_dim)
        assert [f.shape[-1] for f in features] == [2**i for i in range(2, model.size.bit_length())]
        assert torch.equal(model.decode(z, features), model(crops))


def test_restorer_in_halves_equals_the_whole_forward(tiny, sample_faces):
    crops = at(sample_faces[:6], 64)
    whole = Restorer(copy.deepcopy(tiny), CPU, batch_size=4)
    halves = Restorer(tiny, CPU, batch_size=4, halves=True)
    assert torch.equal(halves(crops), whole(crops))
    seen = []  # the mix sees each device batch once, in order, by its first position
    halves(crops, mix=lambda start, z, features: seen.append((start, len(z), len(features))))
    assert seen == [(0, 4, 5), (4, 2, 5)]  # 6 faces in batches of 4; 5 maps from 4 to 64
    with pytest.raises(ValueError, match="no latents"):
        Restorer(Identity(64), CPU)(crops, mix=lambda *_: None)


# --- ema -----------------------------------------------------------------------------------------


def test_ema_first_frame_is_off_and_a_static_face_stays_put(restorer, sample_faces):
    faces = at(sample_faces[:3], 64)
    off = restorer(faces)
    smoother = LatentSmoother()
    out = run_ema(restorer, smoother, [faces] * 4, [["a", "b", "c"]] * 4)
    # A fresh track is exactly its own frame; a still one mixes equal latents: the same.
    assert all(torch.equal(o, off) for o in out)
    assert len(smoother.memory) == 3


def test_ema_converges_on_a_noisy_static_face(restorer, sample_faces):
    face = at(sample_faces[:1], 64)
    generator = torch.Generator().manual_seed(0)
    # Sensor noise of 3 levels (8-bit): the probe's change stays under STILL (measured 1e-4).
    frames = [face + torch.randn(face.shape, generator=generator) * 3 / 127.5 for _ in range(12)]
    off = torch.cat([restorer(f) for f in frames])
    ema = torch.cat(run_ema(restorer, LatentSmoother(), frames, [["a"]] * 12))
    assert torch.equal(ema[0], off[0])
    flicker_off = (off[1:] - off[:-1]).abs().mean().item()
    flicker_ema = (ema[6:] - ema[5:-1]).abs().mean().item()
    # keep 0.6 on white noise: frame-to-frame differences of the state shrink to
    # sqrt((1 - k) / (1 + k)) = 0.5 of the input's in the latents; measured 0.32x on the output.
    assert flicker_ema < 0.5 * flicker_off
    # Converged: the mean of the smoothed frames is the mean of the frames themselves
    # (measured 0.13 of the flicker apart).
    assert (ema[6:].mean(0) - off[6:].mean(0)).abs().mean() < 0.3 * flicker_off


def test_ema_new_keys_start_fresh_and_tracks_never_mix(restorer, sample_faces):
    a, b = at(sample_faces[0:1], 64), at(sample_faces[5:6], 64)
    generator = torch.Generator().manual_seed(1)
    noise = [[torch.randn(x.shape, generator=generator) * 0.02 for x in (a, b)] for _ in range(5)]
    noisy = [[a + na, b + nb] for na, nb in noise]
    together = run_ema(restorer, LatentSmoother(), [torch.cat(f) for f in noisy], [["a", "b"]] * 5)
    alone = run_ema(restorer, LatentSmoother(), [f[0] for f in noisy], [["a"]] * 5)
    for both, one in zip(together, alone, strict=True):
        # Another face in the batch changes nothing but convolution rounding (measured 3e-6).
        assert torch.allclose(both[:1], one, atol=1e-5)
    # A key met for the first time (a track started over) is exactly its own frame.
    smoother = LatentSmoother()
    run_ema(restorer, smoother, [f[0] for f in noisy], [["a"]] * 5)
    fresh = run_ema(restorer, smoother, [noisy[0][0]], [["new"]])[0]
    assert torch.equal(fresh, restorer(noisy[0][0]))


def test_ema_frames_of_one_chunk_follow_each_other(restorer, sample_faces):
    # Four frames of one track in one call, batches of 4 split as 3 + 1 faces over two batches:
    # frame t uses t-1's mixed state even within a batch, as four calls of one frame do.
    generator = torch.Generator().manual_seed(2)
    face = at(sample_faces[2:3], 64)
    frames = [face + torch.randn(face.shape, generator=generator) * 0.02 for _ in range(5)]
    one_call = run_ema(restorer, LatentSmoother(), [torch.cat(frames)], [["a"] * 5])[0]
    per_frame = torch.cat(run_ema(restorer, LatentSmoother(), frames, [["a"]] * 5))
    # Measured: 3e-6 apart (convolution rounding by batch size), 0.054 from off's at most.
    assert torch.allclose(one_call, per_frame, atol=1e-5)
    assert not torch.allclose(one_call, restorer(torch.cat(frames)), atol=1e-2)


def test_ema_resets_at_a_cut_and_lets_fast_motion_through(restorer, sample_faces):
    faces = at(sample_faces, 64)
    smoother = LatentSmoother()
    run_ema(restorer, smoother, [faces[:1]] * 3, [["a"]] * 3)
    # Another face under the same key (a cut): its own frame, exactly.
    other = faces[7:8]
    assert torch.equal(run_ema(restorer, smoother, [other], [["a"]])[0], restorer(other))
    # The probe's change on these faces: still 0, moved 1 px of 64 (a crop's jitter) little,
    # 5 px (a crop the alignment left far behind) past CUT: no smoothing at all.
    still = crop_change(probes(faces), probes(faces))
    one = crop_change(probes(shifted(faces, 1, 0)), probes(faces))
    five = crop_change(probes(shifted(faces, 5, 3)), probes(faces))
    assert still.abs().max() < 1e-5
    # Measured on the sample's 13 faces: 1 px 0.010-0.022 (median 0.015), 5 px 0.23-0.55.
    assert one.median() < temporal.STILL < temporal.CUT < five.min()
    assert temporal.keep_weight(five, temporal.KEEP_EMA).max() == 0


# --- flow ----------------------------------------------------------------------------------------


def test_flow_keeps_a_static_face_steady(sample_faces):
    faces = sample_faces[:4]  # the inputs do not move: zero flow, every pixel consistent
    generator = torch.Generator().manual_seed(3)
    restored = [faces + torch.randn(faces.shape, generator=generator) * 0.05 for _ in range(8)]
    smoother = FlowSmoother()
    keys = ["a", "b", "c", "d"]
    out = [smoother.blend(smoother.plan(keys, faces), r) for r in restored]
    assert torch.equal(out[0], restored[0])  # a new track: its own output
    flicker_in = torch.stack([(b - a).abs().mean() for a, b in itertools.pairwise(restored)])
    flicker_out = torch.stack([(b - a).abs().mean() for a, b in itertools.pairwise(out[4:])])
    # keep 0.6 times the agreement weight (noise of 0.05 sits well within AGREEMENT): the
    # recursive blend shrinks the frame-to-frame change (measured 0.34x).
    assert flicker_out.mean() < 0.5 * flicker_in.mean()
    # ... and stays where the frames are: no drift of the steadied face (measured 0.021).
    assert (out[-1] - faces).abs().mean() < 0.05


def test_flow_carries_the_previous_output_by_the_shift(sample_faces):
    faces = sample_faces[:4]
    moved = shifted(faces, 3.0, -2.0)  # the inputs move by (3, -2) pixels of 256
    previous = torch.flip(faces, dims=[1])  # an output unlike its input (channels swapped)
    smoother = FlowSmoother(keep=0.9, agreement=1e3)  # carry nearly all, agreement aside
    keys = ["a", "b", "c", "d"]
    smoother.blend(smoother.plan(keys, faces), previous)
    out = smoother.blend(smoother.plan(keys, moved), torch.zeros_like(moved))
    carried = out / 0.9  # where trusted, out = 0.9 * carried + 0.1 * 0
    inner = np.s_[..., 24:-24, 24:-24]
    expected = shifted(previous, 3.0, -2.0)
    error = (carried - expected)[inner].abs().mean().item()
    unmoved = (previous - expected)[inner].abs().mean().item()
    # DIS on the 128-pixel luma, upsampled: measured 0.001 against 0.058 left where it was.
    assert error < 0.1 * unmoved


def test_flow_resets_at_a_cut_and_new_tracks(sample_faces):
    smoother = FlowSmoother()
    first, other = sample_faces[:1], sample_faces[6:7]
    smoother.blend(smoother.plan(["a"], first), first)
    restored = other * 0.5
    assert torch.equal(smoother.blend(smoother.plan(["a"], other), restored), restored)
    assert torch.equal(smoother.blend(smoother.plan([None], first), first), first)  # no track


def test_tracks_are_forgotten_after_a_few_calls(restorer, sample_faces):
    smoother = LatentSmoother(forget_after=2)
    face = at(sample_faces[:1], 64)
    run_ema(restorer, smoother, [face], [["a"]])
    run_ema(restorer, smoother, [face, face], [["b"], ["b"]])
    assert len(smoother.memory) == 2
    run_ema(restorer, smoother, [face], [["b"]])
    assert smoother.memory.get("a") is None and len(smoother.memory) == 1


def test_inputs_taking_turns_keep_their_tracks_and_an_ended_input_is_forgotten():
    """Inputs sharing one smoother take turns: a track's age counts its own input's calls only
    (ten inputs in turn once made every track start afresh at each of its chunks); an input
    that ends takes its tracks with it."""
    memory = temporal.TrackMemory(forget_after=2)
    cameras = range(10)
    for turn in range(4):  # four rounds of ten calls, one per camera
        for camera in cameras:
            key = (camera, 0, 7)
            memory.begin_call([key])
            assert turn == 0 or memory.get(key) is not None
            memory.put(key, "state")
    assert len(memory) == 10
    memory.begin_call([(0, 0, 8)])  # camera 0's next chunk: track 7 has left
    memory.begin_call([(0, 0, 8)])
    memory.begin_call([(0, 0, 8)])
    assert memory.get((0, 0, 7)) is None and memory.get((1, 0, 7)) is not None
    memory.forget_input(1)
    assert memory.get((1, 0, 7)) is None and len(memory) == 8


# --- the enhancer and the command line ---------------------------------------------------------


def tracked_batch(crops: torch.Tensor, keys) -> FaceBatch:
    n = len(crops)
    return FaceBatch([None] * n, torch.zeros(n, dtype=torch.long), torch.zeros(n, 2, 3), crops,
                     (64, 64), tracks=keys)  # fmt: skip


def test_enhancer_temporal_modes(tiny, detector, sample_faces):
    crops = at(sample_faces[:3], 64)
    off = Enhancer(restorer=Restorer(tiny, CPU), face_detector=detector, device=CPU, mask="box",
                   temporal="off")  # fmt: skip
    batch = tracked_batch(crops, ["a", "b", "c"])
    off.restore(batch)
    assert torch.equal(batch.restored, off.restorer(crops))  # off: the restorer's, untouched
    # Six faces in one device batch (convolutions round by batch size), the first three a photo's.
    reference = off.restorer(torch.cat([crops, crops]))[:3]
    for mode in ("ema", "flow"):
        enhancer = Enhancer(
            restorer=off.restorer, face_detector=detector, device=CPU, mask="box", temporal=mode
        )
        photo = tracked_batch(crops, None)  # no track keys: never steadied
        enhancer.restore_many([photo, tracked_batch(crops, ["a", "b", "c"])])
        assert torch.equal(photo.restored, reference)
        view = enhancer.with_options(blend=0.5)  # a request's run: its own history
        assert len(view._smoother.memory) == 0 < len(enhancer._smoother.memory)
    with pytest.raises(UserError, match="identity"):
        Enhancer(restorer=Restorer(Identity(64), CPU), face_detector=detector, device=CPU,
                 mask="box", temporal="ema")  # fmt: skip


def test_enhance_temporal_on_the_sample(weights_dir, tiny_state_dict, tmp_path):
    """The command line on the sample's first frames with the tiny GPEN (its noise weights
    N(0, 1): it flickers as a trained GPEN's features would), measured as ``streamgpen eval``
    measures: the face regions' warping error along the input's flow."""
    clip = sample_head(tmp_path / "head.mp4", FRAMES)  # a full detection, then tracking
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict, checkpoint)
    outputs, figures = {}, {}
    for mode in ("off", "ema", "flow"):
        out = tmp_path / f"{mode}.mkv"
        args = [str(clip), "-o", str(out), "--model-path", str(checkpoint),
                "--detector", "retinaface_mobile0.25", "--weights-dir", str(weights_dir),
                "--device", "cpu", "--mask", "box", "--codec", "ffv1", "--quiet",
                "--faces-json", str(out.with_suffix(".jsonl"))]  # fmt: skip
        # In process through the typer app: an interpreter and its torch import cost ~5 s.
        result = CliRunner().invoke(app, ["enhance", *args, "--temporal", mode])
        assert result.exit_code == 0, result.output
        outputs[mode] = np.stack(decoded_frames(out)).astype(np.int16)
        report = evaluate_video(str(out), str(clip), faces_json=out.with_suffix(".jsonl"),
                                quiet=True)  # fmt: skip
        figures[mode] = {k: report["warping_error"][k]["mean"] for k in ("output", "source")}
    assert all(len(frames) == FRAMES for frames in outputs.values())
    for mode in ("ema", "flow"):
        # The first frame: every track new, exactly off's; later frames steadied, so different.
        assert np.array_equal(outputs[mode][0], outputs["off"][0])
        assert np.abs(outputs[mode][1:] - outputs["off"][1:]).max() > 10
    # Measured (8 frames, 8-bit levels): input 2.31; off 3.77, ema 3.24 (0.86x), flow 2.50
    # (0.66x). The input's own figure is the floor. A random GPEN-BFR-256 on 30 frames:
    # benchmarks/results/temporal-cpu.json.
    source = figures["off"]["source"]
    assert figures["ema"]["output"] < 0.95 * figures["off"]["output"], figures
    assert figures["flow"]["output"] < 0.8 * figures["off"]["output"], figures
    assert figures["flow"]["output"] > 0.9 * source, figures


def test_a_folder_of_photos_is_never_steadied(shared_dir, weights_dir, tiny_state_dict, tmp_path):
    """Photos' faces are numbered per photo, not tracked: a burst of near-identical photos must
    not blend one photo's faces into the next (with flow, the default, they once were: face i
    of every photo had the same track key). The second photo enhanced in a folder run equals
    it enhanced alone."""
    import cv2

    photo = cv2.imread(str(shared_dir / "media" / "Solvay_conference_1927.png"))[150:330, 380:700]
    folder = tmp_path / "burst"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), photo)
    cv2.imwrite(str(folder / "b.png"), cv2.add(photo, 3))  # the next shot: a little brighter
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict, checkpoint)
    common = ["--model-path", str(checkpoint), "--detector", "retinaface_mobile0.25",
              "--weights-dir", str(weights_dir), "--device", "cpu", "--mask", "box", "--quiet",
              "--temporal", "flow"]  # fmt: skip
    runs = [[str(folder), "-o", str(tmp_path / "all")],
            [str(folder / "b.png"), "-o", str(tmp_path / "alone.png")]]  # fmt: skip
    for args in runs:
        result = CliRunner().invoke(app, ["enhance", *args, *common])
        assert result.exit_code == 0, result.output
    together = cv2.imread(str(tmp_path / "all" / "b.png"))
    alone = cv2.imread(str(tmp_path / "alone.png"))
    assert not np.array_equal(together, cv2.add(photo, 3))  # faces were found and restored
    assert np.array_equal(together, alone)


def test_a_finished_video_leaves_no_history_in_a_shared_enhancer(weights_dir, tmp_path):
    """The service's streams share one enhancer that outlives each: a video's end forgets its
    tracks (each holds a restored crop, or GPEN's latents)."""
    import io

    from rich.console import Console

    from streamgpen.apps.enhance import load_enhancer
    from streamgpen.apps.videos import enhance_video
    from streamgpen.config import (
        DetectorConfig,
        EnhancerConfig,
        FaceConfig,
        ModelConfig,
        RunConfig,
        SinkConfig,
        VideoConfig,
    )

    clip = sample_head(tmp_path / "head.mp4", 3)
    config = RunConfig(
        input=str(clip),
        output=str(tmp_path / "out.mkv"),
        quiet=True,
        enhancer=EnhancerConfig(
            model=ModelConfig(name="identity"),
            detector=DetectorConfig(name="retinaface_mobile0.25"),
            faces=FaceConfig(mask="box", temporal="flow"),
            device="cpu",
            weights_dir=weights_dir,
        ),
        video=VideoConfig(sink=SinkConfig(codec="ffv1")),
    )
    enhancer = load_enhancer(config)
    seen = []
    put = enhancer._smoother.memory.put
    enhancer._smoother.memory.put = lambda key, state: seen.append(key) or put(key, state)
    enhance_video(config, enhancer, console=Console(file=io.StringIO()))
    assert len(set(seen)) >= 10  # the sample's faces had their history while the video ran
    assert len(enhancer._smoother.memory) == 0
