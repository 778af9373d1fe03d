"""STU-Net (Huang et al., 2023): a scalable residual U-Net with nnU-Net style deep supervision.

Module names reproduce the official implementation so that released checkpoints load with
``strict=True``: ``conv_blocks_context.{stage}.{block}.{conv1,conv2,conv3,norm1,norm2}.*``,
``upsample_layers.{u}.conv.*``, ``conv_blocks_localization.{u}.{block}.*`` and ``seg_outputs.{u}.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from anatomask_components.networks.contract import (
    PretrainingBackbone,
    filter_by_key_map,
    strip_wrapper_prefixes,
)
from anatomask_components.networks.sparse import SparseContext, Stride, register_sparse_rule

__all__ = [
    "STUNET_INPUT_CONV_KEYS",
    "STUNET_PRESETS",
    "STUNET_PRESET_STRIDES",
    "BasicResBlock",
    "STUNet",
    "UpsampleNearest",
    "print_presets",
    "stunet_filter_fn",
    "stunet_key_map",
    "stunet_preset",
]

# size -> (blocks per stage, widths per stage); docs/method.md §3.2. "tiny" is no paper preset: the
# 5-stage network of the tests, benchmarks and the bundles' small_override.json (smoke runs on a CPU).
STUNET_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "S": ((1,) * 6, (16, 32, 64, 128, 256, 256)),
    "B": ((1,) * 6, (32, 64, 128, 256, 512, 512)),
    "L": ((2,) * 6, (64, 128, 256, 512, 1024, 1024)),
    "H": ((3,) * 6, (96, 192, 384, 768, 1536, 1536)),
    "tiny": ((1,) * 5, (8, 16, 32, 64, 64)),
}
# TotalSegmentator plan: stage 0 keeps the resolution, stages 1-4 halve it, the bottleneck keeps it.
DEFAULT_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 2, 2),) * 4 + ((1, 1, 1),)
# Presets whose strides are not the first ones of DEFAULT_STRIDES: tiny halves three times, then keeps.
STUNET_PRESET_STRIDES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "tiny": ((2, 2, 2),) * 3 + ((1, 1, 1),),
}

# The two convolutions of a STU-Net that read the input image: the first 3x3x3 convolution of stage 0
# and the 1x1 shortcut projection of the same block.
STUNET_INPUT_CONV_KEYS: tuple[str, ...] = (
    "conv_blocks_context.0.0.conv1.weight",
    "conv_blocks_context.0.0.conv3.weight",
)
# The sparse pretraining encoder keeps the STU-Net modules under this name (reference and this project).
_SPARSE_ENCODER_MARKER = "sp_cnn."


def stunet_key_map(keys: Sequence[str]) -> dict[str, str]:
    """Map the keys of a file to STU-Net keys.

    Wrapper prefixes (``module.``, ``_orig_mod.``) are dropped. If any key belongs to a sparse pretraining
    encoder (contains ``sp_cnn.``), only those keys are used, with everything up to ``sp_cnn.`` removed
    (what the reference fine-tuning loader does); the other keys are not mapped.

    Args:
        keys: the file's keys.

    Returns:
        ``{STU-Net key: file key}``.

    Raises:
        ValueError: two file keys map to the same STU-Net key.
    """
    sparse = any(_SPARSE_ENCODER_MARKER in k for k in keys)
    mapping: dict[str, str] = {}
    for key in keys:
        if sparse:
            if _SPARSE_ENCODER_MARKER not in key:
                continue
            name = key.split(_SPARSE_ENCODER_MARKER, 1)[1]
        else:
            name = strip_wrapper_prefixes(key)
        if name in mapping:
            raise ValueError(f"file keys {mapping[name]!r} and {key!r} both map to {name!r}")
        mapping[name] = key
    return mapping


def stunet_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict under STU-Net keys (:func:`stunet_key_map`; timm's filter function)."""
    return filter_by_key_map(state_dict, stunet_key_map)


def stunet_preset(size: str) -> dict[str, list]:
    """A preset as :class:`STUNet` keyword arguments: ``{"depths", "dims", "strides"}`` (lists).

    ``STUNet(c_in, c_out, **stunet_preset(size))`` is ``STUNet(c_in, c_out, size=size)``.
    """
    if size not in STUNET_PRESETS:
        raise ValueError(f"unknown STU-Net size {size!r}; choose one of {sorted(STUNET_PRESETS)}.")
    depths, dims = STUNET_PRESETS[size]
    strides = STUNET_PRESET_STRIDES.get(size, DEFAULT_STRIDES[: len(dims) - 1])
    return {"depths": list(depths), "dims": list(dims), "strides": [list(s) for s in strides]}


class BasicResBlock(nn.Module):
    """Residual block: conv3(stride) -> IN -> LeakyReLU -> conv3 -> IN, plus shortcut, then LeakyReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the 1x1 shortcut).
        use_1x1conv: project the shortcut with a 1x1 convolution (first block of each stage).
        kernel_size: kernel size of the two main convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: Sequence[int] | int = 1,
        use_1x1conv: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act2 = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return self.act2(y + shortcut)


def _sparse_basic_res_block(
    context: SparseContext, block: BasicResBlock, h: torch.Tensor, stride: Stride
) -> tuple[torch.Tensor, Stride]:
    """:class:`BasicResBlock` on the visible voxels (its sparse rule, see ``networks.sparse``)."""
    # in-place activations on fresh tensors: autograd keeps one copy instead of input and output
    y, out_stride = context.conv_norm(block.conv1, block.norm1, h, stride)
    y = F.leaky_relu(y, block.act1.negative_slope, True)
    y, _ = context.conv_norm(block.conv2, block.norm2, y, out_stride)
    shortcut = context.conv(block.conv3, h, stride)[0] if block.conv3 is not None else h
    return F.leaky_relu(y + shortcut, block.act2.negative_slope, True), out_stride


register_sparse_rule(BasicResBlock, _sparse_basic_res_block)


class UpsampleNearest(nn.Module):
    """Nearest-neighbour upsampling followed by a 1x1 convolution (STU-Net's decoder upsampling)."""

    def __init__(self, in_channels: int, out_channels: int, scale_factor: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        # a list of floats: the only per-axis scale_factor type TorchScript's F.interpolate accepts
        self.scale_factor: list[float] = [float(s) for s in scale_factor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


def _init_he(module: nn.Module) -> None:
    """nnU-Net's initialisation (InitWeights_He, negative slope 1e-2)."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _stage(in_channels: int, out_channels: int, depth: int, stride: Sequence[int] | int) -> nn.Sequential:
    blocks = [BasicResBlock(in_channels, out_channels, stride=stride, use_1x1conv=True)]
    blocks += [BasicResBlock(out_channels, out_channels) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class STUNet(nn.Module):
    """STU-Net for 3D segmentation.

    Args:
        in_channels: input channels (1 for CT, 2 for PET/CT).
        out_channels: number of classes including background.
        size: preset name, one of ``S``, ``B``, ``L``, ``H`` (the paper's) or ``tiny`` (5 stages, widths
            8..64, strides ``[2,2,2] x 3 + [1,1,1]``: smoke tests); ignored where ``depths`` and ``dims``
            are given.
        depths: residual blocks per stage (6 entries for the presets; any length >= 2).
        dims: widths per stage, same length as ``depths``.
        strides: strides of stages 1..n-1 (one fewer than stages), each an int or a 3-tuple.
            Default: the TotalSegmentator plan ``[2,2,2] x 4 + [1,1,1]``.
        deep_supervision: in training mode return the outputs of every decoder stage but the
            coarsest, full resolution first (nnU-Net convention). In eval mode only the full
            resolution output is returned.

    Input: ``(B, in_channels, H, W, D)`` with each spatial size divisible by the total stride.
    Output: ``(B, out_channels, H, W, D)`` logits, or a list of logits at decreasing resolution.

    The network is scriptable (``torch.jit.script``, as MONAI's ``ckpt_export`` runs it). It is a
    :class:`~anatomask_components.networks.contract.PretrainingBackbone`: the pretraining runs its encoder
    stages ``conv_blocks_context`` sparsely (``STUNet(in_channels, 1, ...)`` there: its decoder and
    segmentation head are not pretrained).
    """

    __jit_unused_properties__ = ["total_stride", "encoder_stages", "encoder_strides", "encoder_widths"]

    # Fine-tuning contract (networks.contract.fine_tuning_contract; weights.transfer_weights asks for it):
    # the convolutions that read the input image, and the map from a checkpoint's keys to this network's.
    input_conv_keys = STUNET_INPUT_CONV_KEYS
    pretrained_key_map = staticmethod(stunet_key_map)
    pretrained_filter_fn = staticmethod(stunet_filter_fn)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 105,
        size: str = "B",
        depths: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        strides: Sequence[Sequence[int] | int] | None = None,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if (depths is None) != (dims is None):
            raise ValueError("give both `depths` and `dims` for a custom STU-Net, or neither to use `size`.")
        if depths is None:
            if size not in STUNET_PRESETS:
                raise ValueError(f"unknown STU-Net size {size!r}; choose one of {sorted(STUNET_PRESETS)}.")
            depths, dims = STUNET_PRESETS[size]
            if strides is None:
                strides = STUNET_PRESET_STRIDES.get(size)
        if len(depths) != len(dims) or len(depths) < 2:
            raise ValueError(f"`depths` and `dims` need the same length >= 2, got {depths} and {dims}.")
        num_pool = len(dims) - 1
        if strides is None:
            strides = DEFAULT_STRIDES[:num_pool] if num_pool <= len(DEFAULT_STRIDES) else None
            if strides is None:
                raise ValueError(f"give `strides` for a STU-Net with {len(dims)} stages.")
        strides = [(s,) * 3 if isinstance(s, int) else tuple(int(v) for v in s) for s in strides]
        if len(strides) != num_pool:
            raise ValueError(f"need {num_pool} strides for {len(dims)} stages, got {len(strides)}.")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.strides = tuple(strides)
        self.deep_supervision = deep_supervision

        self.conv_blocks_context = nn.ModuleList([_stage(in_channels, dims[0], depths[0], 1)])
        for d in range(1, num_pool + 1):
            self.conv_blocks_context.append(_stage(dims[d - 1], dims[d], depths[d], strides[d - 1]))
        self.upsample_layers = nn.ModuleList(
            UpsampleNearest(dims[-1 - u], dims[-2 - u], strides[-1 - u]) for u in range(num_pool)
        )
        self.conv_blocks_localization = nn.ModuleList(
            _stage(dims[-2 - u] * 2, dims[-2 - u], depths[-2 - u], 1) for u in range(num_pool)
        )
        self.seg_outputs = nn.ModuleList(
            nn.Conv3d(dims[-2 - u], out_channels, kernel_size=1) for u in range(num_pool)
        )
        self.apply(_init_he)

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Product of the encoder strides per spatial axis."""
        total = [1, 1, 1]
        for s in self.strides:
            total = [t * v for t, v in zip(total, s)]
        return tuple(total)

    @property
    def encoder_stages(self) -> nn.ModuleList:
        """The encoder stages, finest first (what the sparse pretraining encoder runs)."""
        return self.conv_blocks_context

    @property
    def encoder_strides(self) -> list[tuple[int, int, int]]:
        """The stride of each encoder stage relative to its input (stage 0 keeps the resolution)."""
        return [(1, 1, 1), *self.strides]

    @property
    def encoder_widths(self) -> list[int]:
        """The output channels of each encoder stage."""
        return list(self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        num_pool = len(self.upsample_layers)
        skips: list[torch.Tensor] = []
        # TorchScript cannot slice a ModuleList: keep the bottleneck out of the skips by index
        for d, stage in enumerate(self.conv_blocks_context):
            x = stage(x)
            if d < num_pool:
                skips.append(x)
        deep = self.deep_supervision and self.training
        outputs: list[torch.Tensor] = []
        for u, (up, block, head) in enumerate(
            zip(self.upsample_layers, self.conv_blocks_localization, self.seg_outputs)
        ):
            x = block(torch.cat((up(x), skips[-(u + 1)]), dim=1))
            if deep or u == num_pool - 1:
                outputs.append(head(x))
        if deep:
            # full resolution first; the coarsest output is left out, as in nnU-Net
            return outputs[::-1][:-1] if len(outputs) > 1 else outputs
        return outputs[-1]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def print_presets(in_channels: int = 1, out_channels: int = 105) -> dict[str, int]:
    """Print each preset's parameter count (built on the meta device, so even H costs no memory).

    Returns:
        preset name -> parameter count.
    """
    counts = {}
    print(f"STU-Net presets ({in_channels} input, {out_channels} output channels)")
    print(f"{'size':<5}{'blocks/stage':<14}{'widths':<34}{'params':>10}")
    for name, (depths, dims) in STUNET_PRESETS.items():
        with torch.device("meta"):
            net = STUNet(in_channels, out_channels, size=name)
        counts[name] = count_parameters(net)
        widths = " ".join(str(d) for d in dims)
        print(f"{name:<5}{depths[0]:<14}{widths:<34}{counts[name] / 1e6:>9.2f}M")
    return counts


if TYPE_CHECKING:  # the declaration of conformance, checked by type checkers (and by tests at run time)
    _conforms: type[PretrainingBackbone] = STUNet
