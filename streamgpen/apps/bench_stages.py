"""What each output-quality stage costs per frame: a 1080p frame with four faces.

The stages ``--upscale``, ``--bg-upsampler``, ``--mask parse``, ``--color-match`` and
``--temporal flow`` (the default) add to the restore: the background at 2x (a resize, then each
registered super-resolution architecture), the face parsers' masks for four restored crops, the
paste itself at 1x and 2x, and the flow blend of four tracked faces. Networks are randomly
initialised, seeded (their speed does not depend on the weights' values), in the
architectures and sizes of the released files. On a CPU the super-resolution networks are timed
on a 240x135 frame and scaled to 1080p by pixel count (they are convolutional: their cost is
proportional to the pixels; a full-size CPU run takes minutes), which the row says.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from rich.table import Table
from spandrel import ModelLoader
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN

from streamgpen.faces.align import paste_faces, similarity_transform, template, warp_faces
from streamgpen.faces.color_match import match_color
from streamgpen.faces.parse import NETWORKS, FaceParser, build_network
from streamgpen.faces.temporal import FlowSmoother
from streamgpen.runtime.upsampler import DEFAULT_TILE_OVERLAP, NetworkUpsampler, ResizeUpsampler

FRAME = (1080, 1920)  # (height, width)
CPU_NETWORK_FRAME = (135, 240)
CROP = 512
FACES = 4
TILE = 400


# The registered super-resolution architectures at their released sizes (built random).
SR_NETWORKS = {
    "RealESRGAN_x2plus": lambda: ESRGAN(num_blocks=23, scale=2, shuffle_factor=2),
    "RealESRGAN_x4plus": lambda: ESRGAN(num_blocks=23, scale=4),
    "realesr-general-x4v3": lambda: Compact(num_feat=64, num_conv=32, upscale=4),
}


def bench_stages(
    device: torch.device,
    *,
    repeats: int = 3,
    frame_size: tuple[int, int] = FRAME,
    upsamplers: tuple[str, ...] = tuple(SR_NETWORKS),
    parsers: tuple[str, ...] = tuple(NETWORKS),
) -> list[dict]:
    """Rows ``{stage, ms_per_frame, note}`` for one ``frame_size`` frame with four 512 faces
    (the ``upsamplers`` and ``parsers`` named; all by default)."""
    torch.manual_seed(0)
    frame = torch.rand(1, 3, *frame_size, device=device)
    faces = _faces(frame)
    rows = [_row("upscale x2: resize (--bg-upsampler none)", _timed(
        lambda: ResizeUpsampler()(frame, 2.0), device, repeats))]  # fmt: skip
    rows += [_network_row(name, frame_size, device, repeats) for name in upsamplers]
    restored = faces["crops"]
    for name in parsers:
        kind = NETWORKS[name]
        parser = FaceParser(build_network(name), kind, device=device, dtype=torch.float16)
        seconds = _timed(lambda p=parser: p.masks(restored), device, repeats)
        rows.append(_row(f"parse masks: {name}, {FACES} faces", seconds))
    up = ResizeUpsampler()(frame, 2.0)
    for label, target, matrices in (("1x", frame, faces["m1"]), ("2x", up, faces["m2"])):
        seconds = _timed(lambda t=target, m=matrices: paste_faces(t, restored, m), device, repeats)
        rows.append(_row(f"paste {FACES} faces at {label}", seconds))
    weights = torch.ones(FACES, 1, CROP, CROP, device=device)
    seconds = _timed(lambda: match_color(restored, restored, weights), device, repeats)
    rows.append(_row(f"--color-match, {FACES} faces", seconds))
    rows.append(_row(f"--temporal flow, {FACES} faces", _flow_seconds(restored, device, repeats)))
    return rows


def _flow_seconds(restored: torch.Tensor, device: torch.device, repeats: int) -> float:
    """``--temporal flow`` on four tracks past their first frame: the host's optical flows and
    the device's blend (the default mode's cost; ``ema``'s is a few in-place lerps)."""
    smoother = FlowSmoother()
    keys = [("bench", 0, i) for i in range(len(restored))]
    smoother.blend(smoother.plan(keys, restored), restored)  # the tracks' first frame: no flow
    return _timed(lambda: smoother.blend(smoother.plan(keys, restored), restored), device, repeats)


def _faces(frame: torch.Tensor) -> dict[str, torch.Tensor]:
    """Four faces of ~360 px in a row, their crops and matrices for 1x and 2x outputs."""
    from streamgpen.enhancer import output_matrices

    h, w = frame.shape[-2:]
    points = template(CROP).to(frame.device) * 0.7  # a face ~0.7 the crop: 360 px
    landmarks = torch.stack([points + torch.tensor([100.0 + 440 * i, 300.0]).to(frame.device)
                             for i in range(FACES)])  # fmt: skip
    m1 = similarity_transform(landmarks, template(CROP).to(frame.device))
    crops = warp_faces(frame, m1, CROP)
    return {"crops": crops, "m1": m1, "m2": output_matrices(m1, (h, w), (2 * h, 2 * w))}


def _network_row(
    name: str, frame_size: tuple[int, int], device: torch.device, repeats: int
) -> dict:
    descriptor = ModelLoader().load_from_state_dict(SR_NETWORKS[name]().state_dict())
    up = NetworkUpsampler(
        descriptor, device, dtype=torch.float16, tile=TILE, tile_overlap=DEFAULT_TILE_OVERLAP
    )
    small = frame_size[0] * frame_size[1] <= CPU_NETWORK_FRAME[0] * CPU_NETWORK_FRAME[1]
    size = frame_size if device.type == "cuda" or small else CPU_NETWORK_FRAME
    frame = torch.rand(1, 3, *size, device=device)
    seconds = _timed(lambda: up(frame, 2.0), device, repeats)
    scale = (frame_size[0] * frame_size[1]) / (size[0] * size[1])
    note = "" if scale == 1 else f"timed at {size[1]}x{size[0]}, x{scale:.0f} by pixels"
    return _row(f"upscale x2: {name}", seconds * scale, note)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` calls (one on the CPU, where eager calls cost the same from the
    first and the parsers take seconds a face), after one warm-up on CUDA, waited for there."""
    if device.type == "cuda":
        fn()
    best = float("inf")
    for _ in range(repeats if device.type == "cuda" else 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _row(stage: str, seconds: float, note: str = "") -> dict:
    return {"stage": stage, "ms_per_frame": round(seconds * 1e3, 2), "note": note}


def format_stages(rows: list[dict], frame_size: tuple[int, int] = FRAME) -> Table:
    """The stage costs as a table that fits 80 columns."""
    h, w = frame_size
    table = Table(title=f"Output-quality stages, per {w}x{h} frame, {FACES} faces (random)")
    table.add_column("stage")
    table.add_column("ms/frame", justify="right")
    table.add_column("note")
    for row in rows:
        table.add_row(row["stage"], f"{row['ms_per_frame']:.1f}", row["note"])
    return table
