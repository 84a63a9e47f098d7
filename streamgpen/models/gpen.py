"""GPEN: GAN Prior Embedded Network for blind face restoration (Yang et al., CVPR 2021).

A StyleGAN2 generator (the GAN prior) whose constant-input decoder is driven by an encoder: the
encoder's last feature map, flattened and mapped, becomes the latent code, and every encoder feature
map takes the place of StyleGAN2's noise input at the decoder layer of the same resolution,
*concatenated* to its activations after scaling by the layer's learned noise weight.

Module and parameter names follow the official implementation, so the released GPEN-BFR checkpoints
load with ``strict=True``. Plain PyTorch: the official CUDA ops become a depthwise convolution
(``upfirdn2d``) and ``leaky_relu`` (``fused_leaky_relu``).

Shapes: B batch, C channels, H/W spatial, S ``style_dim``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)
SQRT2 = math.sqrt(2)


@dataclass(frozen=True)
class GPENConfig:
    """The hyper-parameters that fix a GPEN's architecture, and so its state_dict's shapes."""

    size: int
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: float = 2
    narrow: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def channel_table(channel_multiplier: float, narrow: float) -> dict[int, int]:
    """Feature channels at each resolution: StyleGAN2's table scaled by GPEN's ``narrow``."""
    return {
        4: int(512 * narrow),
        8: int(512 * narrow),
        16: int(512 * narrow),
        32: int(512 * narrow),
        64: int(256 * channel_multiplier * narrow),
        128: int(128 * channel_multiplier * narrow),
        256: int(64 * channel_multiplier * narrow),
        512: int(32 * channel_multiplier * narrow),
        1024: int(16 * channel_multiplier * narrow),
        2048: int(8 * channel_multiplier * narrow),
    }


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """The normalised 2-D separable FIR kernel built from a 1-D one."""
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, then FIR-filter each channel (one depthwise convolution).

    x: [B, C, H, W] -> [B, C, H*up + pad0 + pad1 - kh + 1, W*up + pad0 + pad1 - kw + 1]
    """
    b, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    # upfirdn2d convolves; conv2d correlates: flip the kernel.
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sqrt(2) * leaky_relu(x + bias, 0.2); the gain keeps activations' variance at 1."""
    bias = bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x + bias, 0.2) * SQRT2


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class Blur(nn.Module):
    """FIR low-pass around resampling; the kernel is a buffer because the checkpoints store it."""

    def __init__(self, pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(BLUR_KERNEL) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the skip image between ToRGB layers."""

    def __init__(self, factor: int = 2):
        super().__init__()
        kernel = make_kernel(BLUR_KERNEL) * factor**2
        self.register_buffer("kernel", kernel)
        p = kernel.shape[0] - factor
        self.factor = factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate: weights stored N(0, 1), scaled by 1/sqrt(fan_in)."""

    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding
        )

    def __repr__(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"EqualConv2d({i}, {o}, {k}, stride={self.stride}, padding={self.padding})"


class EqualLinear(nn.Module):
    """Linear with equalised learning rate and an optional fused leaky ReLU."""

    def __init__(self, in_dim, out_dim, bias_init=0.0, lr_mul=1.0, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the input's dtype, not the weight's: the style path runs in fp32 in an fp16 model.
        # Cast before scaling: the style MLP's scale (lr_mul 0.01) would push fp16 products of
        # small weights into subnormals.
        weight = self.weight.to(x.dtype) * self.scale
        bias = self.bias.to(x.dtype) * self.lr_mul
        if self.activation:
            return fused_leaky_relu(F.linear(x, weight), bias)
        return F.linear(x, weight, bias)

    def __repr__(self) -> str:
        o, i = self.weight.shape
        return f"EqualLinear({i}, {o}, lr_mul={self.lr_mul}, activation={self.activation})"


class ModulatedConv2d(nn.Module):
    """StyleGAN2's weight-(de)modulated convolution, executed in its batch-friendly form.

    Instead of building a per-sample weight and running a grouped convolution, the styles scale the
    input activations, one convolution runs with the shared weight for the whole batch, and the
    demodulation coefficients scale its output. The two are equal (modulation and demodulation are
    per-channel scalings on either side of a linear map), and this form batches on cuDNN and in
    CUDA graphs without per-batch weight tensors.

    Reduced precision: styles and demodulation coefficients are always computed in fp32, and the
    styles are divided by their per-sample maximum before they scale the activations (StyleGAN3's
    pre-normalisation), so that neither ``x * s`` nor ``s**2`` can overflow fp16; the demodulation
    is invariant to that scale, and without demodulation the output is multiplied back by it.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
    ):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(
            torch.randn(1, out_channel, in_channel, kernel_size, kernel_size)
        )
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        if upsample:
            # The transposed stride-2 convolution's output, filtered back to exactly 2x the input.
            p = (len(BLUR_KERNEL) - 2) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        # x: [B, Cin, H, W], style: [B, S] -> [B, Cout, H', W']
        s = self.modulation(style.float())  # [B, Cin]
        peak = s.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)  # [B, 1]
        s = s / peak
        weight = self.weight[0] * self.scale  # [Cout, Cin, k, k]
        x = x * s[:, :, None, None].to(x.dtype)
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
            out = self.blur(out)
        else:
            out = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        if self.demodulate:
            # 1 / ||w * s||_2 over (Cin, k, k), per sample and output channel: [B, Cout]
            w_sq = weight.float().square().sum(dim=(2, 3))  # [Cout, Cin]
            gain = torch.rsqrt(s.square() @ w_sq.t() + 1e-8)
        else:
            gain = peak.expand(-1, self.out_channel)
        return out * gain[:, :, None, None].to(out.dtype)

    def __repr__(self) -> str:
        return (
            f"ModulatedConv2d({self.in_channel}, {self.out_channel}, {self.kernel_size}, "
            f"demodulate={self.demodulate}, upsample={self.upsample})"
        )


class NoiseInjection(nn.Module):
    """GPEN's noise: the encoder's feature map, weighted and concatenated to the activations."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W], feature: [B, C, H, W] -> [B, 2C, H, W]
        return torch.cat((x, self.weight.to(feature.dtype) * feature), dim=1)


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv, then the encoder feature concatenated, then the biased activation."""

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel, out_channel, kernel_size, style_dim, upsample=upsample
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel * 2)

    def forward(self, x, style, feature):
        return self.activate(self.noise(self.conv(x, style), feature))


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias.to(x.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """StyleGAN2's synthesis network with concatenated (doubled-width) noise inputs."""

    def __init__(self, size, style_dim, n_mlp, channel_multiplier, narrow, lr_mlp=0.01):
        super().__init__()
        self.log_size = int(math.log2(size))
        self.style = nn.Sequential(
            PixelNorm(),
            *(
                EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True)
                for _ in range(n_mlp)
            ),
        )
        channels = channel_table(channel_multiplier, narrow)
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], 3, style_dim)
        self.to_rgb1 = ToRGB(channels[4] * 2, style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channel = channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = channels[2**i]
            self.convs.append(StyledConv(in_channel * 2, out_channel, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_channel * 2, out_channel, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_channel * 2, style_dim))
            in_channel = out_channel

    def forward(self, z: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # z: [B, S]; features: encoder maps from 4x4 up to size x size -> image [B, 3, size, size]
        w = self.style(z)
        out = self.conv1(self.input(z.shape[0]).to(features[0].dtype), w, features[0])
        skip = self.to_rgb1(out, w)
        for conv_up, conv, to_rgb, feature in zip(
            self.convs[::2], self.convs[1::2], self.to_rgbs, features[1:], strict=True
        ):
            out = conv_up(out, w, feature)
            out = conv(out, w, feature)
            skip = to_rgb(out, w, skip)
        return skip


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> FusedLeakyReLU, the encoder's building block."""

    def __init__(self, in_channel, out_channel, kernel_size, downsample=False):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_KERNEL) - 2) + (kernel_size - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(
            EqualConv2d(in_channel, out_channel, kernel_size, stride, padding, bias=False)
        )
        layers.append(FusedLeakyReLU(out_channel))
        super().__init__(*layers)


class GPEN(nn.Module):
    """The GPEN face restoration network (the official ``FullGenerator``).

    ``forward(x)``: x is a batch of aligned faces, RGB in [-1, 1], [B, 3, size, size]; returns the
    restored faces in the same convention.
    """

    def __init__(
        self,
        size: int,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: float = 2,
        narrow: float = 1.0,
    ):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"GPEN size must be a power of two >= 8, not {size}")
        self.config = GPENConfig(size, style_dim, n_mlp, channel_multiplier, narrow)
        self.size = size
        log_size = int(math.log2(size))
        channels = channel_table(channel_multiplier, narrow)
        self.generator = Generator(size, style_dim, n_mlp, channel_multiplier, narrow)
        # The official names ecd0..ecdN are kept so that checkpoints load unchanged.
        self.ecd0 = nn.Sequential(ConvLayer(3, channels[size], 1))
        in_channel = channels[size]
        for i in range(log_size, 2, -1):
            out_channel = channels[2 ** (i - 1)]
            setattr(
                self,
                f"ecd{log_size - i + 1}",
                nn.Sequential(ConvLayer(in_channel, out_channel, 3, downsample=True)),
            )
            in_channel = out_channel
        self.encoder_names = [f"ecd{i}" for i in range(log_size - 1)]
        self.final_linear = nn.Sequential(
            EqualLinear(channels[4] * 4 * 4, style_dim, activation=True)
        )

    @classmethod
    def from_config(cls, config: GPENConfig) -> GPEN:
        return cls(**config.as_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, size, size] -> [B, 3, size, size]
        return self.decode(*self.encode(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder half: the style code z [B, S] (fp32 in any precision) and the feature
        maps [B, C, r, r] in the generator's order, from r = 4 up to ``size``: what the decoder
        takes, and what temporal smoothing (``--temporal ema``) averages per face track."""
        # x: [B, 3, size, size]
        features = []
        for name in self.encoder_names:
            x = getattr(self, name)(x)
            features.append(x)  # size x size down to 4x4
        z = self.final_linear(x.flatten(1).float())  # [B, S], fp32 in any precision
        return z, features[::-1]

    def decode(self, z: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The decoder half: the restored faces [B, 3, size, size] of :meth:`encode`'s outputs."""
        return self.generator(z, features)


_STYLE_KEY = re.compile(r"^generator\.style\.(\d+)\.weight$")


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> GPENConfig:
    """The GPEN config whose state_dict has these tensor shapes (custom-trained GPENs too).

    Raises ValueError when the dict is not a GPEN generator's.
    """
    try:
        n_mlp = sum(1 for k in state_dict if _STYLE_KEY.match(k))
        style_dim = state_dict["final_linear.0.weight"].shape[0]
        n_encoder = sum(1 for k in state_dict if re.match(r"^ecd\d+\.0\.\d+\.weight$", k))
        size = 2 ** (n_encoder + 1)
        ch4 = state_dict["generator.input.input"].shape[1]
    except (KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"not a GPEN generator state_dict (missing {e})") from None
    narrow = ch4 / 512
    channel_multiplier: float = 2
    if size >= 64:
        # convs[2 * (log2(64) - 3)] is the first layer at 64x64; its activation is 2x wide.
        ch64 = state_dict[f"generator.convs.{2 * (6 - 3)}.activate.bias"].shape[0] // 2
        channel_multiplier = ch64 / (256 * narrow)
        if channel_multiplier == int(channel_multiplier):
            channel_multiplier = int(channel_multiplier)
    if narrow == int(narrow):
        narrow = int(narrow)
    config = GPENConfig(size, style_dim, n_mlp, channel_multiplier, narrow)
    mismatch = shape_mismatch(config, state_dict)
    if mismatch:
        raise ValueError(f"not a GPEN generator state_dict ({mismatch})")
    return config


def expected_shapes(config: GPENConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of a GPEN with this config and its shape, computed without memory."""
    with torch.device("meta"):
        model = GPEN.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shape_mismatch(config: GPENConfig, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """A one-line description of how ``state_dict`` differs from ``config``'s, or None."""
    return compare_shapes(expected_shapes(config), state_dict)


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> str | None:
    """How ``state_dict``'s keys and shapes differ from ``expected`` (one line), or None.

    The one comparison behind every structure check, GPEN's and RetinaFace's alike.
    """
    missing = [k for k in expected if k not in state_dict]
    if missing:
        return f"{len(missing)} missing keys, e.g. {missing[0]}"
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}"
    for k, shape in expected.items():
        got = tuple(getattr(state_dict[k], "shape", ()))
        if got != shape:
            return f"{k} has shape {list(got)}, expected {list(shape)}"
    return None
