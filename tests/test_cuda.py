"""What only a GPU can show: CUDA-graph replay, fp16 on the GPU, compiled graphs, the stream-ordered
uploads and downloads, and the whole video pipeline on CUDA against the CPU.

CI has no GPU, so these are skipped there; run them on a CUDA machine with
``python -m pytest -q tests/test_cuda.py`` (the CPU counterparts are in test_runtime.py and
test_color.py).
"""

from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import pytest
import torch
from test_color import colour_pattern, tinted_sample_clip, write_clip

from streamgpen.enhancer import Enhancer
from streamgpen.faces.track import Tracker
from streamgpen.media.planes import host_planes
from streamgpen.media.sinks import open_sink
from streamgpen.media.video import open_source
from streamgpen.models.gpen import GPEN
from streamgpen.models.weights import MODELS
from streamgpen.pipeline.build import video_pipeline
from streamgpen.runtime.restorer import Identity, Restorer
from streamgpen.runtime.transfer import Downloader, Uploader

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): run it on one"
)
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
MIN_PSNR_FP16 = 40.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = (a.float().cpu() - b.float().cpu()).square().mean().item()
    return 10 * math.log10(4 / mse) if mse > 0 else math.inf


def faces(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture
def tiny(tiny_config, tiny_state_dict) -> GPEN:
    model = GPEN.from_config(tiny_config).eval()
    model.load_state_dict(tiny_state_dict)
    return model


def random_gpen(name: str) -> GPEN:
    torch.manual_seed(0)
    return GPEN.from_config(MODELS[name].config).eval()


def test_graph_replay_equals_eager_for_every_batch_size(tiny):
    # Same weights and precision: a captured graph replays the eager kernels, partial batches
    # padded into the next bucket included. Not bit for bit: cuDNN may pick other algorithms for
    # the padded batch size, and fp32 convolutions run in TF32 by default.
    graphs = Restorer(copy.deepcopy(tiny), CUDA, batch_size=8, precision="fp32")
    eager = Restorer(copy.deepcopy(tiny), CUDA, batch_size=8, precision="fp32", cuda_graphs=False)
    graphs.warmup()
    assert graphs.cuda_graphs and all(b.graph is not None for b in graphs._static.values())
    for n in (1, 3, 8, 11):
        x = faces(n, 64, seed=n)
        assert psnr(graphs(x), eager(x)) >= 50, n


@pytest.mark.parametrize("name", ["tiny", "GPEN-BFR-256", "GPEN-BFR-512"])
def test_fp16_graphs_are_close_to_fp32_eager(tiny, name):
    model = tiny if name == "tiny" else random_gpen(name)
    x = faces(4, model.size)
    reference = Restorer(copy.deepcopy(model), CUDA, 4, precision="fp32", cuda_graphs=False)(x)
    out = Restorer(model, CUDA, 4)(x)  # the default on CUDA: fp16 + graphs
    assert torch.isfinite(out).all()
    assert psnr(out, reference) >= MIN_PSNR_FP16


def test_compiled_graphs_equal_plain_graphs(tiny):
    x = faces(3, 64)
    plain = Restorer(copy.deepcopy(tiny), CUDA, 4)(x)
    compiled = Restorer(copy.deepcopy(tiny), CUDA, 4, compile=True)
    compiled.warmup()
    assert psnr(compiled(x), plain) >= MIN_PSNR_FP16  # inductor rounds fp16 its own way


def test_uploads_and_downloads_on_streams_equal_the_cpu_path(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, colour_pattern(96, 64), "yuv420p", rotation=90)
    on_gpu, on_cpu = Uploader(CUDA), Uploader(CPU, yuv_on_device=True)
    with open_source(str(clip)) as source:
        for frame in source:
            pixels = on_gpu(host_planes(frame, yuv=True))
            assert pixels.yuv and pixels.ready is not None
            assert torch.allclose(
                pixels.rgb().cpu(), on_cpu(host_planes(frame, yuv=True)).rgb(), atol=1e-5
            )
    frames = torch.rand(3, 3, 64, 96, device=CUDA)
    downloaded = [image.get() for image in Downloader(CUDA)(frames)]
    expected = [image.get() for image in Downloader(CPU)(frames.cpu())]
    assert all(np.array_equal(a, b) for a, b in zip(downloaded, expected, strict=True))


def run_identity_pipeline(device: torch.device, detector_factory, clip, out) -> None:
    detector = detector_factory(device)
    enhancer = Enhancer(
        restorer=Restorer(Identity(), device), face_detector=detector, device=device, mask="box"
    )
    with open_source(str(clip)) as source:
        pipeline = video_pipeline(
            source=source,
            sink=open_sink(f"{out}/", source),
            enhancer=enhancer,
            tracker=Tracker(detector),
            yuv_on_device=True,
        )
        assert pipeline.run().frames_out == 10


def test_pipeline_on_cuda_matches_the_cpu(shared_dir, tmp_path):
    from streamgpen.faces.detect import FaceDetector

    def detector(device):
        weights = shared_dir / "weights" / "detection_mobilenet0.25_Final.pth"
        return FaceDetector("mobile0.25", weights, device)

    clip = tmp_path / "sepia.mp4"
    tinted_sample_clip(clip)
    run_identity_pipeline(CUDA, detector, clip, tmp_path / "gpu")
    run_identity_pipeline(CPU, detector, clip, tmp_path / "cpu")
    for gpu, cpu in zip(sorted((tmp_path / "gpu").glob("*.png")),
                        sorted((tmp_path / "cpu").glob("*.png")), strict=True):  # fmt: skip
        a, b = cv2.imread(str(gpu)).astype(float), cv2.imread(str(cpu)).astype(float)
        # The same but for the faces, where landmarks from the GPU's detector differ slightly.
        assert np.mean(np.abs(a - b) <= 1) > 0.95
        assert 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12)) > 40


# --- temporal stabilisation (--temporal ema|flow) on CUDA: the two halves' graphs --------------


def test_halves_graphs_equal_the_whole_forward_and_take_the_mix(tiny):
    from streamgpen.faces.temporal import LatentSmoother

    x = faces(6, 64, seed=4)
    whole = Restorer(copy.deepcopy(tiny), CUDA, batch_size=4, precision="fp32")(x)
    halves = Restorer(copy.deepcopy(tiny), CUDA, batch_size=4, precision="fp32", halves=True)
    halves.warmup()
    buckets = halves._static.values()
    assert buckets and all(b.graphs is not None for b in buckets)  # both halves captured
    assert psnr(halves(x), whole) >= 50  # the same kernels, replayed as two graphs
    # The mix runs between the replays, on the encoder graph's outputs: zeroing z there gives
    # what the eager halves give for a zero z.
    zeroed = halves(x, mix=lambda start, z, features: z.zero_())
    eager = Restorer(copy.deepcopy(tiny), CUDA, batch_size=4, precision="fp32", cuda_graphs=False)
    assert psnr(zeroed, eager(x, mix=lambda start, z, features: z.zero_())) >= 50
    assert psnr(zeroed, whole) < 40
    # ema on fp16 graphs against ema on the CPU in fp32, frame after frame of two tracks.
    frames = [x[:2] + 0.02 * faces(2, 64, seed=t) for t in range(5)]
    on_gpu, on_cpu = LatentSmoother(), LatentSmoother()
    fp16 = Restorer(copy.deepcopy(tiny), CUDA, batch_size=4, halves=True)
    cpu = Restorer(copy.deepcopy(tiny), CPU, batch_size=4, halves=True)
    for frame in frames:
        keys = ["a", "b"]
        gpu_out = fp16(frame, mix=on_gpu.mixer(keys, frame.to(CUDA)))
        cpu_out = cpu(frame, mix=on_cpu.mixer(keys, frame))
        assert psnr(gpu_out, cpu_out) >= MIN_PSNR_FP16


def test_flow_blend_on_cuda_matches_the_cpu():
    from streamgpen.faces.temporal import FlowSmoother

    generator = torch.Generator().manual_seed(5)
    base = torch.nn.functional.avg_pool2d(torch.rand(3, 3, 272, 272, generator=generator), 9, 1)
    frames = [base[..., t : t + 256, 0:256] * 2 - 1 for t in range(3)]  # a texture moving down
    on_gpu, on_cpu = FlowSmoother(), FlowSmoother()
    for t, frame in enumerate(frames):
        restored = frame * 0.8 + 0.1 * faces(3, 256, seed=t)  # a flickering output
        keys = ["a", "b", "c"]
        gpu = on_gpu.blend(on_gpu.plan(keys, frame.to(CUDA)), restored.to(CUDA))
        cpu = on_cpu.blend(on_cpu.plan(keys, frame), restored)
        assert gpu.device.type == "cuda"
        # The flows are the host's either way; grid_sample and the weights round differently.
        # (The blend moves these outputs by up to 0.1 from the restored ones.)
        assert (gpu.cpu() - cpu).abs().max() < 1e-3
