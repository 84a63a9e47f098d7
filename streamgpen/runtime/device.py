"""Device policy, in one place: which device and precision a run uses, and how cuDNN behaves.

cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is a process-wide switch. GPEN wants it on:
its shapes are fixed per batch bucket, so each convolution is timed once. The detector wants it
off: its input shape changes with every photo size and every count and size of tracking crops, and
autotuning would time every convolution again for each new shape. The restorer turns it on once
(:func:`autotune_convolutions`) and the detector runs inside :func:`fixed_algorithms`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from streamgpen.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """The torch device for ``--device`` (``auto``/None: CUDA when available, else CPU)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s)")
        # Library calls that take no device (graph capture's synchronize, empty_cache) act on
        # the current one: make it this one, not GPU 0.
        torch.cuda.set_device(device)
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for ``precision`` (``auto``: fp16 on CUDA, fp32 elsewhere)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (use auto, {', '.join(PRECISIONS)})")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bf16: use fp16")
    return PRECISIONS[precision]


def as_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch device; names (and None/``auto``) go through :func:`resolve_device`."""
    return device if isinstance(device, torch.device) else resolve_device(device)


def autotune_convolutions() -> None:
    """Let cuDNN time its algorithms per shape (for networks whose shapes are fixed)."""
    torch.backends.cudnn.benchmark = True


@contextmanager
def fixed_algorithms() -> Iterator[None]:
    """cuDNN's autotuner off inside the block (for networks whose input shapes keep changing),
    restored after it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
