"""The device worker's stages: track, restore (align, GPEN, paste), download.

Each stage is an object with a ``name`` and ``process(packets)``: it reads what earlier stages
put on the chunk's packets and adds what it computes, timing itself with the :class:`StageClock`
it was built with. The engine runs them in order on each chunk of frames; a photo runs
:class:`DetectStage` and :class:`RestoreStage` on a one-frame chunk.
Shapes: B frames in the chunk, N faces in it, H/W frame size, S crop size.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch

from streamgpen.faces.types import Face, FaceBatch, TrackedFace, nearest_to_center
from streamgpen.pipeline.packet import FramePacket

if TYPE_CHECKING:
    from streamgpen.enhancer import Enhancer
    from streamgpen.faces.parse import MaskSmoother
    from streamgpen.faces.track import Tracker
    from streamgpen.runtime.transfer import Downloader


# Numbers the video inputs' restore stages: a track key names its input (see FaceBatch.tracks).
_INPUTS = itertools.count()
# The restorer's device batches so far in this process (the face log's batch numbers).
_BATCH_LOCK = threading.Lock()
_batches_done = 0


class Stage(Protocol):
    """One step of the device worker."""

    name: str

    def process(self, packets: list[FramePacket]) -> None: ...


class StageClock:
    """Times a stage into its packets' ``stage_seconds`` and names it in torch.profiler traces.

    ``sync_device``: a CUDA device whose current stream is synchronised when a stage ends, so the
    figures are the device's (bench); otherwise kernels still running count toward a later stage.
    Only the worker's stream: a device-wide sync would also wait for the decoder's uploads and the
    encoder's downloads, which overlap by design.
    """

    def __init__(self, sync_device: torch.device | None = None):
        self.sync_device = sync_device if sync_device and sync_device.type == "cuda" else None

    @contextmanager
    def __call__(self, stage: str, packets: Sequence[FramePacket]) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"stage:{stage}"):
                yield
        finally:
            if self.sync_device is not None:
                torch.cuda.current_stream(self.sync_device).synchronize()
            share = (time.perf_counter() - start) / max(len(packets), 1)
            for packet in packets:
                packet.add_time(stage, share)


def chunk_images(packets: Sequence[FramePacket]) -> torch.Tensor:
    """The chunk's frames on the device as one [B, 3, H, W] batch."""
    return torch.stack([p.image for p in packets])


class TrackStage:
    """Uploaded pixels to RGB on the device, then the tracker's faces for each frame.

    The tracker starts afresh on a packet marked ``discontinuity`` (a reconnect may show another
    scene). ``only_center_face`` keeps the tracked face nearest the frame's centre.
    """

    name = "detect_track"

    def __init__(self, tracker: Tracker, clock: StageClock, *, only_center_face: bool = False):
        self.tracker = tracker
        self.clock = clock
        self.only_center_face = only_center_face

    def process(self, packets: list[FramePacket]) -> None:
        with self.clock(self.name, packets):
            for packet in packets:
                self._track(packet)

    def _track(self, packet: FramePacket) -> None:
        if packet.image is None:
            packet.image = packet.pixels.rgb()  # [3, H, W]
        if packet.discontinuity:
            self.tracker.reset()
        before = self.tracker.full_detections
        faces = self.tracker.update(packet.image, packet.seconds)
        packet.full_detection = self.tracker.full_detections > before
        if self.only_center_face:
            faces = center_face(faces, packet.image.shape[-1], packet.image.shape[-2])
        packet.faces = faces


class DetectStage:
    """Full detection on every frame (photos): each face is its own one-frame track."""

    name = "detect_track"

    def __init__(self, enhancer: Enhancer, clock: StageClock):
        self.enhancer = enhancer
        self.clock = clock

    def process(self, packets: list[FramePacket]) -> None:
        with self.clock(self.name, packets):
            found = self.enhancer.detect(chunk_images(packets))
        for packet, faces in zip(packets, found, strict=True):
            packet.faces = [TrackedFace(face, i, True) for i, face in enumerate(faces)]
            packet.full_detection = True


class RestoreStage:
    """Align every face of the chunk, restore them in one batched call, parse their masks
    (``--mask parse``), upscale the frames (``--upscale``) and paste the faces back with the
    blend of the chunk's controls snapshot; frames with enhancement off are only upscaled.

    ``tracked`` (video): the faces are tracks across the frames, so they get track keys
    (``FaceBatch.tracks``, what ``--temporal`` steadies); photos' faces are numbered per photo
    and are no tracks. ``smoother`` (video) steadies each track's parsed mask over the frames;
    ``on_batch(n)`` hears of each batch of n faces restored (a photo's progress). One stage
    serves one input: its track keys are its own. :func:`restore_together` restores the
    chunks of several inputs' stages in shared device batches.
    """

    name = "restore"

    def __init__(
        self,
        enhancer: Enhancer,
        clock: StageClock,
        *,
        tracked: bool,
        smoother: MaskSmoother | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.enhancer = enhancer
        self.clock = clock
        self.tracked = tracked
        self.smoother = smoother
        self.on_batch = on_batch
        self._input = next(_INPUTS)  # this input's track keys apart from any other input's
        self._generation = 0  # bumped at each discontinuity: the tracker's ids start over

    def process(self, packets: list[FramePacket]) -> None:
        restore_together([(self, packets)])

    def align(self, packets: list[FramePacket]) -> FaceBatch | None:
        """The chunk's faces warped to the template, their track keys set if ``tracked`` (None:
        the chunk's controls have enhancement off)."""
        if not packets[0].controls.enhance:  # one snapshot per chunk
            return None
        with self.clock(self.name, packets):
            batch = self.enhancer.align(chunk_images(packets), [faces_of(p) for p in packets])
        if self.tracked:
            batch.tracks = self._track_keys(packets)
        return batch

    def finish(self, packets: list[FramePacket], batch: FaceBatch | None) -> None:
        """Parse, upscale and paste the restored ``batch`` into the chunk's outputs."""
        enhancer = self.enhancer
        frames = chunk_images(packets)  # [B, 3, H, W]
        if batch is not None:
            with self.clock("parse", packets):
                enhancer.parse(batch)
                if self.smoother is not None and batch.masks is not None:
                    batch.masks = self._steady(packets, batch.masks)
        with self.clock("upscale", packets):
            out = enhancer.background(frames)  # [B, 3, H', W']
        if batch is not None:
            with self.clock("blend", packets):
                out = enhancer.paste(out, batch, blend=packets[0].controls.blend)
        for packet, image in zip(packets, out, strict=True):
            packet.output = image
        if len(packets) == 1:
            packets[0].batch = batch  # a photo's crops, for --save-faces

    def close(self) -> None:
        """The input has ended: its tracks' temporal history is forgotten (an enhancer shared
        by the service's streams outlives each of them)."""
        if self.tracked:
            self.enhancer.forget_tracks(self._input)

    def _track_keys(self, packets: list[FramePacket]) -> list[tuple[int, int, int]]:
        keys = []
        for packet in packets:
            if packet.discontinuity:
                self._generation += 1
            keys += [(self._input, self._generation, t.track_id) for t in packet.faces]
        return keys

    def _steady(self, packets: list[FramePacket], masks: torch.Tensor) -> torch.Tensor:
        """masks [N, 1, S, S] of the chunk's faces, frame after frame through the smoother."""
        steady, start = [], 0
        for packet in packets:
            if packet.discontinuity:
                self.smoother.reset()
            tracks = [t.track_id for t in packet.faces]
            steady.append(self.smoother(masks[start : start + len(tracks)], tracks))
            start += len(tracks)
        return torch.cat(steady)


def restore_together(work: Sequence[tuple[RestoreStage, list[FramePacket]]]) -> None:
    """Restore the chunks of several inputs' stages (``(stage, packets)`` pairs, all of one
    enhancer's models) in one restorer call, so that their faces share device batches: a face of
    one camera and one of another in the same batch. Each chunk is aligned, parsed and pasted by
    its own stage, with its own state and options."""
    batches = [stage.align(packets) for stage, packets in work]
    restoring = [b for b in batches if b is not None]
    if restoring:
        first, _ = work[0]
        pairs = list(zip(work, batches, strict=True))
        everything = [p for (_, packets), batch in pairs if batch is not None for p in packets]
        with first.clock(first.name, everything):
            first.enhancer.restore_many(restoring, first.on_batch)
        _number_batches(everything, first.enhancer.restorer.batch_size)
    for (stage, packets), batch in zip(work, batches, strict=True):
        stage.finish(packets, batch)


def _number_batches(packets: list[FramePacket], batch_size: int) -> None:
    """Each face's device batch number: ``restore_many`` cuts the faces of ``packets``, in this
    order, into batches of ``batch_size``."""
    total = sum(len(p.faces) for p in packets)
    with _BATCH_LOCK:  # the service's runs restore from several threads
        global _batches_done
        first, _batches_done = _batches_done, _batches_done + math.ceil(total / batch_size)
    done = 0
    for packet in packets:
        count = len(packet.faces)
        packet.face_batches = [first + (done + i) // batch_size for i in range(count)]
        done += count


class DownloadStage:
    """The chunk's output frames on their way to the host (waited for by the encoder)."""

    name = "download"

    def __init__(self, downloader: Downloader, clock: StageClock):
        self.downloader = downloader
        self.clock = clock

    def process(self, packets: list[FramePacket]) -> None:
        with self.clock(self.name, packets):
            hosts = self.downloader(torch.stack([p.output for p in packets]))
        for packet, host in zip(packets, hosts, strict=True):
            packet.host = host


def center_face(faces: list[TrackedFace], width: int, height: int) -> list[TrackedFace]:
    """The tracked face whose box centre is nearest the image centre (none when there is none)."""
    index = nearest_to_center([t.face for t in faces], width, height)
    return [] if index is None else [faces[index]]


def faces_of(packet: FramePacket) -> list[Face]:
    """The packet's faces as detected faces (without their tracks)."""
    return [t.face for t in packet.faces]
