"""Running GPEN on batches of aligned face crops: device, precision and batching.

The restorer is the one place that knows how the network is executed. Callers hand it any number of
crops and get the restored crops back in the same order.

Weights and activations are ``channels_last`` everywhere. On CUDA the network runs in fp16 and
each batch size it is given is padded up to a fixed *bucket* (1, 2, 4, ...), whose forward is
captured once as a CUDA graph and then replayed: one launch per batch instead of hundreds of small
kernel launches from Python. On the CPU it runs eagerly in fp32.

With ``halves`` (what ``--temporal ema`` needs) GPEN runs as its encoder, then a caller's ``mix``
of the latents (z and the encoder features, in place), then its decoder; on CUDA both halves are
captured per bucket, the mix runs eagerly between the two replays.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from streamgpen.errors import UserError
from streamgpen.runtime.device import autotune_convolutions, resolve_precision

IDENTITY = "identity"
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
# The CUDA graph docs warm up on a side stream before capture; 3 iterations also let cuDNN's
# autotuner and torch.compile finish their one-off work on the exact shapes that are captured.
WARMUP_ITERS = 3
COMPILE_RECOMPILE_LIMIT = 64


def bucket_sizes(batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The padded batch sizes used for ``batch_size``: the buckets below it, and itself.

    A full batch is never padded, so ``batch_size`` is always one of them.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    return tuple(sorted({b for b in buckets if 0 < b < batch_size} | {batch_size}))


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``n`` faces; ValueError when none does."""
    fits = [b for b in sizes if b >= n]
    if n < 1 or not fits:
        raise ValueError(f"no bucket in {tuple(sizes)} holds a batch of {n}")
    return min(fits)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store ``model``'s 4-D parameters and buffers channels-last, in place; returns it.

    ``Module.to(memory_format=...)`` would also try the 5-D modulated-convolution weights
    [1, Cout, Cin, k, k] and fail; they are used as [Cout, Cin, k, k] slices, converted per call.
    channels_last is cuDNN's fast layout for fp16 and also faster on the CPU (oneDNN): GPEN-BFR-256
    at batch 1 took 158 ms against 183 ms contiguous here.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


class Identity(nn.Module):
    """A stand-in restorer that returns each crop unchanged: previews detection and alignment."""

    def __init__(self, size: int = 512):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class StaticBatch:
    """One batch bucket: a fixed-shape input buffer, and on CUDA the graph of the forward on it.

    Batches of up to ``view.shape[0]`` faces are copied into the buffer, the rest of which holds
    stale faces (harmless: faces in a batch are independent), and the first ``n`` outputs are
    returned. The returned tensor is the graph's static output, overwritten by the next call:
    callers copy it out before running another batch.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], view: torch.Tensor):
        self.forward = forward
        self.input = view  # [B, 3, S, S] fp32; B is this bucket's size
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input.shape[0]

    def capture(self, stream: torch.cuda.Stream) -> None:
        """Warm up on ``stream``, then capture the forward on it as a CUDA graph (CUDA only)."""
        current = torch.cuda.current_stream(self.input.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_ITERS):
                self.forward(self.input)
        current.wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # The same stream as the warm-up, so that library handles created there are reused.
        # thread_local: other threads (decoding, detection) may allocate while this one captures.
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.output = self.forward(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n <= B, 3, S, S] fp32 on the buffer's device -> [n, 3, S, S] fp32
        n = x.shape[0]
        self.input[:n].copy_(x)
        if self.graph is None:
            self.output = self.forward(self.input)
        else:
            self.graph.replay()
        return self.output[:n]


# What runs between GPEN's halves on each device batch: (the batch's first position in the call's
# crops, z [n, S'], features [n, C, r, r] from r = 4 up), views of the latents, mixed in place.
LatentMix = Callable[[int, torch.Tensor, list[torch.Tensor]], None]
BatchMix = Callable[[torch.Tensor, list[torch.Tensor]], None]  # one batch's: no position


class StaticHalves:
    """One batch bucket of a model run in two halves: a fixed-shape input buffer, and on CUDA a
    graph for each half. The encoder's outputs (z and the features) are the decoder's inputs: a
    ``mix`` between the replays changes them in place. Captured in one memory pool (the two always
    replay in this order). Outputs are overwritten by the next call, as with StaticBatch."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]],
        decode: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
        view: torch.Tensor,
    ):
        self.encode = encode
        self.decode = decode
        self.input = view  # [B, 3, S, S] fp32; B is this bucket's size
        self.graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self.latents: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.output: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input.shape[0]

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The encoder's graph (None: eager), for the same checks as StaticBatch's."""
        return None if self.graphs is None else self.graphs[0]

    def capture(self, stream: torch.cuda.Stream) -> None:
        """Warm up on ``stream``, then capture each half on it as a CUDA graph (CUDA only)."""
        current = torch.cuda.current_stream(self.input.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_ITERS):
                self.decode(*self.encode(self.input))
        current.wait_stream(stream)
        encoder, decoder = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(encoder, stream=stream, capture_error_mode="thread_local"):
            self.latents = self.encode(self.input)
        with torch.cuda.graph(
            decoder, pool=encoder.pool(), stream=stream, capture_error_mode="thread_local"
        ):
            self.output = self.decode(*self.latents)
        self.graphs = (encoder, decoder)

    def __call__(self, x: torch.Tensor, mix: BatchMix | None = None) -> torch.Tensor:
        # x: [n <= B, 3, S, S] fp32 on the buffer's device -> [n, 3, S, S] fp32
        n = x.shape[0]
        self.input[:n].copy_(x)
        if self.graphs is None:
            self.latents = self.encode(self.input)
        else:
            self.graphs[0].replay()
        z, features = self.latents
        if mix is not None:
            mix(z[:n], [f[:n] for f in features])
        if self.graphs is None:
            self.output = self.decode(z, features)
        else:
            self.graphs[1].replay()
        return self.output[:n]


@dataclass
class Restorer:
    """Restores aligned faces with a GPEN-like network in batches of at most ``batch_size``.

    ``model`` maps [B, 3, S, S] RGB in [-1, 1] to the same; ``size`` is S. The restorer owns the
    model: it is moved, cast to ``precision`` and made ``channels_last`` in place.

    - ``precision``: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16`` or ``bf16``.
      Inputs and outputs are fp32 whatever it is. fp16 on the CPU is correct but very slow.
    - ``cuda_graphs`` (default: on CUDA): batches are padded to one of ``buckets`` (those below
      ``batch_size``, and ``batch_size``), each captured once as a CUDA graph and replayed.
      Call ``warmup()`` at start-up to capture them all before the first frame.
    - ``compile``: ``torch.compile`` the forward (before capture, when capturing); batches are
      padded to the buckets too, so that it compiles once per bucket rather than per batch size.
    - ``halves``: run GPEN as ``encode``, then the call's ``mix`` if any, then ``decode`` (the
      model's methods; ``--temporal ema``); on CUDA both halves are captured per bucket. A call
      with a ``mix`` runs in halves either way (its buckets made on first use).

    On CUDA it turns ``torch.backends.cudnn.benchmark`` on, for the whole process.
    """

    model: nn.Module
    device: torch.device
    batch_size: int = 8
    precision: str = "auto"
    cuda_graphs: bool | None = None
    compile: bool = False
    buckets: Sequence[int] = DEFAULT_BUCKETS
    halves: bool = False

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.size = int(self.model.size)
        self.is_identity = isinstance(self.model, Identity)
        self.dtype = resolve_precision(self.precision, self.device)
        on_cuda = self.device.type == "cuda"
        if self.cuda_graphs is None:
            self.cuda_graphs = on_cuda and not self.is_identity
        if self.cuda_graphs and not on_cuda:
            raise UserError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.model = to_channels_last(self.model.to(self.device, self.dtype))
        self.model.eval()
        if self.halves and not hasattr(self.model, "encode"):
            raise ValueError(f"{type(self.model).__name__} has no encode/decode halves")
        self._forward = self._eager_forward
        self._encode, self._decode = self._eager_encode, self._eager_decode
        if self.compile:
            # Each bucket is a compilation of the same code (and each Restorer, e.g. in bench, a
            # few more); past dynamo's recompile limit it would silently fall back to eager.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILE_RECOMPILE_LIMIT)
            # Default mode: "reduce-overhead" would add inductor's own CUDA graphs to ours.
            self._forward = torch.compile(self._eager_forward, dynamic=False)
            self._encode = torch.compile(self._eager_encode, dynamic=False)
            self._decode = torch.compile(self._eager_decode, dynamic=False)
        static = (self.cuda_graphs or self.compile) and not self.is_identity
        self._sizes = bucket_sizes(self.batch_size, self.buckets) if static else ()
        self._static: dict[tuple[int, bool], StaticBatch | StaticHalves] = {}  # (size, halves)
        self._input: torch.Tensor | None = None  # [max bucket, 3, S, S], made on first use
        # High priority: a stream from another pool than the default-priority ones that other
        # threads draw (round-robin, 32 per pool) for uploads and decoding, which must never be
        # the stream a graph is being captured on.
        self._stream = torch.cuda.Stream(self.device, priority=-1) if self.cuda_graphs else None
        if on_cuda:
            # Every shape is fixed (one per bucket): let cuDNN time its algorithms for each once.
            autotune_convolutions()

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, S, S] fp32 in [-1, 1] -> [B, 3, S, S] fp32 in [-1, 1]
        x = x.to(self.dtype, memory_format=torch.channels_last)
        return self.model(x).float().clamp_(-1, 1)

    def _eager_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # x: [B, 3, S, S] fp32 in [-1, 1] -> z [B, S'] fp32, features in the model's precision
        return self.model.encode(x.to(self.dtype, memory_format=torch.channels_last))

    def _eager_decode(self, z: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        # -> [B, 3, S, S] fp32 in [-1, 1], as _eager_forward's
        return self.model.decode(z, features).float().clamp_(-1, 1)

    def _bucket(self, size: int, halves: bool) -> StaticBatch | StaticHalves:
        """The bucket of ``size`` faces, whole or in ``halves``, created (and on CUDA captured)
        on first use."""
        if (size, halves) not in self._static:
            if self._input is None:
                # One input buffer for all buckets, each a view of its first rows.
                self._input = torch.zeros(
                    max(self._sizes), 3, self.size, self.size, device=self.device
                )
            view = self._input[:size]
            if halves:
                bucket = StaticHalves(self._encode, self._decode, view)
            else:
                bucket = StaticBatch(self._forward, view)
            if self.cuda_graphs:
                bucket.capture(self._stream)
            self._static[size, halves] = bucket
        return self._static[size, halves]

    @torch.inference_mode()
    def warmup(self) -> None:
        """Prepare every bucket now (CUDA graph capture, compilation) rather than on first use,
        whole or in halves as ``halves`` says.

        Nothing to do for the eager path without ``compile``, nor for buckets already made: a
        second call (videos warm GPEN up, then the whole enhancer) costs nothing.
        """
        made = {size for size, halves in self._static if halves == self.halves}
        # Largest first: its memory is claimed before the smaller buckets fragment the heap.
        for size in sorted(set(self._sizes) - made, reverse=True):
            bucket = self._bucket(size, self.halves)
            if bucket.graph is None:
                bucket(bucket.input)  # compiles the forward for this shape
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, x: torch.Tensor, mix: BatchMix | None) -> torch.Tensor:
        # x: [n <= batch_size, 3, S, S] fp32 -> [n, 3, S, S] fp32, valid until the next call
        halves = self.halves or mix is not None
        if self._sizes:
            bucket = self._bucket(bucket_for(x.shape[0], self._sizes), halves)
            return bucket(x, mix) if halves else bucket(x)
        if not halves:
            return self._forward(x)
        z, features = self._encode(x)
        if mix is not None:
            mix(z, features)
        return self._decode(z, features)

    @torch.inference_mode()
    def __call__(
        self,
        crops: torch.Tensor,
        on_batch: Callable[[int], None] | None = None,
        mix: LatentMix | None = None,
    ) -> torch.Tensor:
        """Restore ``crops`` [N, 3, S, S] RGB in [-1, 1] (any N, any device) -> [N, 3, S, S]
        fp32 in [-1, 1] on ``device``; ``on_batch(n)`` after each batch of n is queued (a
        photo's progress); ``mix`` between the halves of each batch, in order (see LatentMix)."""
        if self.is_identity:  # the crops themselves, still counted batch by batch
            if mix is not None:
                raise ValueError("the identity restorer has no latents to mix")
            for i in range(0, crops.shape[0], self.batch_size):
                if on_batch is not None:
                    on_batch(min(self.batch_size, crops.shape[0] - i))
            return crops
        if mix is not None and not hasattr(self.model, "encode"):
            raise ValueError(f"{type(self.model).__name__} has no encode/decode halves")
        crops = crops.to(self.device, torch.float32)
        out = torch.empty_like(crops)
        for i in range(0, crops.shape[0], self.batch_size):
            chunk = crops[i : i + self.batch_size]
            batch_mix = None if mix is None else functools.partial(mix, i)
            out[i : i + chunk.shape[0]] = self._run(chunk, batch_mix)
            if on_batch is not None:
                on_batch(chunk.shape[0])
        return out
