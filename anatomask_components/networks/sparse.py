"""Sparse encoder for masked image modelling (SparK style, docs/method.md §4).

The encoder runs the unmodified encoder stages of a dense CNN backbone
(:class:`~anatomask_components.networks.contract.PretrainingBackbone`; STU-Net in the bundles) on only the
visible voxels; its state dict keeps the backbone's own key names under ``sp_cnn.``. How a block runs
sparsely is its *sparse rule*, looked up by the block's class (:func:`register_sparse_rule`): plain
``nn.Sequential``, ``nn.Conv3d``, ``nn.InstanceNorm3d`` and ``nn.LeakyReLU`` layers have rules here, a
network's own blocks register theirs beside the network (STU-Net's ``BasicResBlock`` in
:mod:`~anatomask_components.networks.stunet`). Two interchangeable backends compute every rule:

- ``"dense"``: masked dense convolution. Every convolution output is multiplied by the visible mask
  at its resolution, so masked positions stay exactly zero. Fast on GPUs, any device.
- ``"spconv"``: real submanifold sparse convolution with `spconv`; stride-1 convolutions are
  submanifold convolutions, strided ones are sparse convolutions restricted to the visible sites.
- ``"auto"``: per call, the one measured faster on the input's device, for the call's pass (training,
  or a forward without autograd such as the EMA teacher's) and masked fraction
  (:data:`SPCONV_FROM_MASKED_FRACTION`); masked dense wherever spconv is not installed.

Both give the same features on visible voxels up to floating-point error. The visibility mask is an
explicit argument of every call; nothing is kept in module-level state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from anatomask_components.networks.contract import PretrainingBackbone

__all__ = [
    "SPCONV_FROM_MASKED_FRACTION",
    "SparseContext",
    "SparseEncoder",
    "masked_instance_norm",
    "register_sparse_rule",
    "sparse_rule",
    "upsample_patch_mask",
]

NormPooling = Literal["batch", "sample"]
Backend = Literal["dense", "spconv", "auto"]
Stride = tuple[int, int, int]
# The "auto" backend's rule, per device type and pass ("train": forward and backward, as the student runs;
# "inference": forward without autograd, as the EMA teacher runs): the smallest masked fraction from which
# spconv was measured faster than masked dense convolution (benchmarks/encoder_backends.py, with
# --forward-only for "inference"; docs/benchmarks.md). CPU training: dense at 0.6, spconv at 0.75 and 0.9;
# CPU inference: dense at 0.6 and 0.75, level at 0.8, spconv at 0.9 (spconv gains mostly in the backward).
# None: not measured faster anywhere, masked dense throughout.
SPCONV_FROM_MASKED_FRACTION: dict[str, dict[str, float | None]] = {
    "cpu": {"train": 0.75, "inference": 0.9},
    "cuda": {"train": None, "inference": None},
}


def upsample_patch_mask(active: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Repeat a patch-level mask to a finer voxel grid.

    Args:
        active: ``(B, 1, h, w, d)`` bool, True where a patch is visible.
        factor: repetition per spatial axis.

    Returns:
        ``(B, 1, h * f0, w * f1, d * f2)`` bool.
    """
    for axis, f in enumerate(factor):
        if f > 1:
            active = active.repeat_interleave(int(f), dim=2 + axis)
    return active


class _MaskedInstanceNorm(torch.autograd.Function):
    """Masked instance norm with a hand-written backward that keeps one feature-sized tensor.

    Forward: statistics over the visible voxels (centred two-pass variance, exact in fp32), normalisation
    and affine folded into one per-channel scale and shift, one final mask. Backward: the standard
    normalisation gradient ``scale * (g - mean(g) - x_hat * mean(g * x_hat))`` over the visible voxels,
    recomputing ``x_hat`` from the saved masked input instead of keeping autograd's intermediates.
    """

    @staticmethod
    def forward(ctx, x, m, weight, bias, eps: float, dims: tuple[int, ...]):
        # the masked copy is saved in the input's own dtype (exact: ``m`` is 0 or 1) and the arithmetic
        # runs in ``weight``'s (at least fp32): under bf16 autocast the saved tensor stays bf16-sized
        saved = x * m.to(x.dtype)
        xm = saved.to(weight.dtype)
        count = m.sum(dim=dims, keepdim=True).clamp_min(1.0)
        mean = xm.sum(dim=dims, keepdim=True) / count
        centred = (xm - mean).mul_(m)
        var = centred.square_().sum(dim=dims, keepdim=True) / count
        del centred
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight.view(1, -1, 1, 1, 1)
        shift = bias.view(1, -1, 1, 1, 1) - mean * scale
        ctx.save_for_backward(saved, m, mean, rstd, weight, count)
        ctx.dims = dims
        return torch.addcmul(shift, xm, scale).mul_(m).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xm, m, mean, rstd, weight, count = ctx.saved_tensors
        dims = ctx.dims
        g = grad_out.to(weight.dtype) * m
        x_hat = (xm.to(weight.dtype) - mean).mul_(rstd)
        sum_g = g.sum(dim=dims, keepdim=True)
        sum_g_xhat = (g * x_hat).sum(dim=dims, keepdim=True)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g.sub_(sum_g / count).sub_(x_hat.mul_(sum_g_xhat / count))
            grad_x = grad_x.mul_(rstd * weight.view(1, -1, 1, 1, 1)).mul_(m).to(xm.dtype)
        channel_sums = (0, 2, 3, 4)
        grad_w = sum_g_xhat.sum(dim=channel_sums).view(-1) if ctx.needs_input_grad[2] else None
        grad_b = sum_g.sum(dim=channel_sums).view(-1) if ctx.needs_input_grad[3] else None
        return grad_x, None, grad_w, grad_b, None, None


def masked_instance_norm(
    x: torch.Tensor, mask: torch.Tensor, norm: nn.InstanceNorm3d, pooling: NormPooling = "batch"
) -> torch.Tensor:
    """Instance normalisation whose statistics come from the visible voxels only.

    ``x`` may hold anything at masked positions (e.g. a convolution's output before masking): it is
    masked here, and the result is zero there. Statistics are computed in at least fp32.

    Args:
        x: ``(B, C, H, W, D)`` features.
        mask: ``(B, 1, H, W, D)`` visibility (bool or 0/1).
        norm: supplies ``eps`` and, when affine, ``weight`` and ``bias``.
        pooling: ``"batch"`` pools statistics over the visible voxels of the whole batch (reference),
            ``"sample"`` computes them per sample.

    Returns:
        ``(B, C, H, W, D)`` normalised features, zero where ``mask`` is False.
    """
    dims = (0, 2, 3, 4) if pooling == "batch" else (2, 3, 4)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if norm.affine:
        weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
    else:
        weight = torch.ones(x.shape[1], dtype=dtype, device=x.device)
        bias = torch.zeros_like(weight)
    return _MaskedInstanceNorm.apply(x, mask.to(dtype), weight, bias, norm.eps, dims)


@dataclass
class _SparseLevel:
    """Active voxels of one resolution, in a fixed (row-major) order shared by all tensors there."""

    indices: torch.Tensor  # (N, 4) int32: batch, then the three spatial coordinates
    spatial_shape: list[int]
    batch_size: int
    pairs: dict = field(default_factory=dict)  # (kernel, stride, padding, subm) -> spconv index pairs

    def lookup(self) -> torch.Tensor:
        """Dense grid holding each active voxel's row number, -1 elsewhere."""
        grid = torch.full(
            (self.batch_size, *self.spatial_shape), -1, dtype=torch.long, device=self.indices.device
        )
        idx = self.indices.long()
        grid[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = torch.arange(len(idx), device=idx.device)
        return grid


class _MaskedDenseBackend:
    """Features are dense ``(B, C, H, W, D)`` tensors, zero wherever the mask is False."""

    def __init__(self, norm_pooling: NormPooling) -> None:
        self.norm_pooling = norm_pooling

    def level(self, visible: torch.Tensor) -> torch.Tensor:
        return visible.to(torch.float32)

    def from_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * mask.to(x.dtype)

    def to_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x

    def conv(self, conv: nn.Conv3d, x: torch.Tensor, mask_in: torch.Tensor, mask_out: torch.Tensor):
        y = conv(x)
        # the output's dtype, not the input's: under autocast an fp32 mask would promote y back to fp32
        return y * mask_out.to(y.dtype)

    def conv_norm(
        self, conv: nn.Conv3d, norm: nn.InstanceNorm3d, x: torch.Tensor, mask_in: torch.Tensor, mask_out
    ) -> torch.Tensor:
        # the masked norm reads only visible voxels and zeroes the rest: no separate mask after the conv
        return masked_instance_norm(conv(x), mask_out, norm, self.norm_pooling)

    def norm(self, norm: nn.InstanceNorm3d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_instance_norm(x, mask, norm, self.norm_pooling)


class _SpconvBackend:
    """Features are ``(N, C)`` rows, one per active voxel of the level, computed with spconv."""

    def __init__(self, norm_pooling: NormPooling) -> None:
        try:
            from spconv.core import ConvAlgo
            from spconv.pytorch import functional as spconv_functional
            from spconv.pytorch import ops as spconv_ops
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the 'spconv' backend needs spconv: pip install spconv-cu120 (or the spconv-cuXXX wheel "
                "matching your CUDA; cu120 also runs on CPU)."
            ) from err
        self.norm_pooling = norm_pooling
        self._ops = spconv_ops
        self._functional = spconv_functional
        self._algo = ConvAlgo.Native

    def __reduce__(self):
        # holds Python modules, which cannot be deep-copied or pickled: rebuild instead (EMA teacher)
        return (type(self), (self.norm_pooling,))

    def level(self, visible: torch.Tensor) -> _SparseLevel:
        indices = visible[:, 0].nonzero().to(torch.int32).contiguous()  # spconv reads raw memory
        return _SparseLevel(indices, list(visible.shape[2:]), visible.shape[0])

    def from_dense(self, x: torch.Tensor, level: _SparseLevel) -> torch.Tensor:
        idx = level.indices.long()
        # advanced indexing around a slice gives a channel-major view; spconv reads raw row-major memory
        return x[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]].contiguous()

    def to_dense(self, feats: torch.Tensor, level: _SparseLevel) -> torch.Tensor:
        idx = level.indices.long()
        dense = feats.new_zeros(level.batch_size, *level.spatial_shape, feats.shape[1])
        dense = dense.index_put((idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]), feats)
        return dense.permute(0, 4, 1, 2, 3).contiguous()

    def _pairs(self, level: _SparseLevel, conv: nn.Conv3d, subm: bool):
        key = (conv.kernel_size, conv.stride, conv.padding, subm)
        if key not in level.pairs:
            level.pairs[key] = self._ops.get_indice_pairs(
                level.indices,
                level.batch_size,
                level.spatial_shape,
                self._algo,
                list(conv.kernel_size),
                list(conv.stride),
                list(conv.padding),
                list(conv.dilation),
                [0, 0, 0],
                subm,
                False,
            )
        return level.pairs[key]

    def conv(self, conv: nn.Conv3d, feats: torch.Tensor, level_in: _SparseLevel, level_out: _SparseLevel):
        # spconv's native algorithm expects KRSC weights: (out, k0, k1, k2, in)
        weight = conv.weight.permute(0, 2, 3, 4, 1).contiguous()
        feats = feats.contiguous()
        subm = all(s == 1 for s in conv.stride)
        outids, pairs, pair_num = self._pairs(level_in, conv, subm)
        if subm:
            out = self._functional.indice_subm_conv(feats, weight, pairs, pair_num, len(outids), self._algo)
        else:
            out = self._functional.indice_conv(feats, weight, pairs, pair_num, len(outids), self._algo)
            # a strided sparse convolution activates every site it touches; keep the visible ones, in
            # the level's order (each visible output site is touched: a mask unit spans every stride)
            o = outids.long()
            rows = level_out.lookup()[o[:, 0], o[:, 1], o[:, 2], o[:, 3]]
            keep = rows >= 0
            order = torch.empty(len(level_out.indices), dtype=torch.long, device=out.device)
            order[rows[keep]] = keep.nonzero().squeeze(1)
            out = out[order]
        if conv.bias is not None:
            out = out + conv.bias
        return out

    def conv_norm(
        self, conv: nn.Conv3d, norm: nn.InstanceNorm3d, feats: torch.Tensor, level_in, level_out
    ) -> torch.Tensor:
        return self.norm(norm, self.conv(conv, feats, level_in, level_out), level_out)

    def norm(self, norm: nn.InstanceNorm3d, feats: torch.Tensor, level: _SparseLevel) -> torch.Tensor:
        if self.norm_pooling == "batch":
            mean = feats.mean(dim=0, keepdim=True)
            var = (feats - mean).square().mean(dim=0, keepdim=True)
        else:
            # rows are sorted by sample (nonzero order); torch's reductions per sample are accurate,
            # whereas index_add accumulates sequentially in fp32 and drifts on large levels
            sizes = torch.bincount(level.indices[:, 0].long(), minlength=level.batch_size).tolist()

            def per_sample_mean(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([c.mean(0, keepdim=True).expand_as(c) for c in t.split(sizes)])

            mean = per_sample_mean(feats)
            var = per_sample_mean((feats - mean).square())
        y = (feats - mean) * torch.rsqrt(var + norm.eps)
        if norm.affine:
            y = y * norm.weight + norm.bias
        return y


# rule(context, block, features, stride) -> (features, stride): a block on the visible voxels
SparseRule = Callable[["SparseContext", Any, torch.Tensor, Stride], tuple[torch.Tensor, Stride]]
_SPARSE_RULES: dict[type[nn.Module], SparseRule] = {}


def register_sparse_rule(module_type: type[nn.Module], rule: SparseRule) -> None:
    """Declare how blocks of ``module_type`` run on the visible voxels only.

    The rule applies to that class exactly, not to its subclasses (a subclass may compute something else).
    ``rule(context, block, features, stride)`` computes the block with the operations of
    :class:`SparseContext`, which run on the encoder's current backend, and returns the block's output
    features and their cumulative stride. Elementwise operations that keep zero at zero (sums of features
    of one resolution, LeakyReLU) may be applied to the features directly.

    Args:
        module_type: the block's class.
        rule: the sparse computation of such a block.
    """
    _SPARSE_RULES[module_type] = rule


def sparse_rule(module: nn.Module) -> SparseRule:
    """The sparse rule of ``module``'s class.

    Raises:
        TypeError: no rule is registered for that class.
    """
    rule = _SPARSE_RULES.get(type(module))
    if rule is None:
        cls = type(module)
        raise TypeError(
            f"the sparse encoder has no rule for {cls.__module__}.{cls.__qualname__}: declare how it runs on "
            f"the visible voxels with anatomask_components.networks.sparse.register_sparse_rule("
            f"{cls.__qualname__}, rule) beside the network, or build the block from nn.Sequential, "
            "nn.Conv3d, nn.InstanceNorm3d and nn.LeakyReLU layers, which have rules."
        )
    return rule


def _strided(stride: Stride, step: Sequence[int]) -> Stride:
    return tuple(s * int(v) for s, v in zip(stride, step))


class SparseContext:
    """One forward of the sparse encoder: its backend and the visible sites of every resolution.

    Sparse rules compute with its operations. Features are the backend's: dense ``(B, C, H_i, W_i, D_i)``
    tensors that are zero at masked positions (``"dense"``), or ``(N_i, C)`` rows, one per visible voxel
    (``"spconv"``); each at a cumulative stride ``(s0, s1, s2)`` relative to the input.

    Args:
        backend: the backend of this forward.
        masks: cumulative stride -> ``(B, 1, H_i, W_i, D_i)`` bool visibility
            (:meth:`SparseEncoder.visible_masks`), including the patch mask at ``patch_size``; masks of other
            strides are made from the patch mask when a rule first reaches them.
        patch_size: the mask unit.
    """

    def __init__(self, backend, masks: dict[Stride, torch.Tensor], patch_size: Stride) -> None:
        self.backend = backend
        self.masks = dict(masks)
        self.patch_size = patch_size
        self._levels: dict[Stride, Any] = {}

    def level(self, stride: Stride):
        """The backend's visible sites at ``stride``."""
        if stride not in self._levels:
            if stride not in self.masks:
                if any(p % s for p, s in zip(self.patch_size, stride)):
                    raise ValueError(f"a stride of {stride} does not divide the mask unit {self.patch_size}.")
                factor = [p // s for p, s in zip(self.patch_size, stride)]
                self.masks[stride] = upsample_patch_mask(self.masks[self.patch_size], factor)
            self._levels[stride] = self.backend.level(self.masks[stride])
        return self._levels[stride]

    def run(self, module: nn.Module, features: torch.Tensor, stride: Stride) -> tuple[torch.Tensor, Stride]:
        """``module`` on the visible voxels, by its sparse rule: its output features and their stride."""
        return sparse_rule(module)(self, module, features, stride)

    def conv(self, conv: nn.Conv3d, features: torch.Tensor, stride: Stride) -> tuple[torch.Tensor, Stride]:
        """A convolution computed at the visible sites of its output resolution: features and their stride."""
        out = _strided(stride, conv.stride)
        return self.backend.conv(conv, features, self.level(stride), self.level(out)), out

    def conv_norm(
        self, conv: nn.Conv3d, norm: nn.InstanceNorm3d, features: torch.Tensor, stride: Stride
    ) -> tuple[torch.Tensor, Stride]:
        """:meth:`conv` then :meth:`norm`, in one step (masked dense convolution masks once)."""
        out = _strided(stride, conv.stride)
        return self.backend.conv_norm(conv, norm, features, self.level(stride), self.level(out)), out

    def norm(self, norm: nn.InstanceNorm3d, features: torch.Tensor, stride: Stride) -> torch.Tensor:
        """Instance norm with the statistics of the visible voxels (pooled as ``norm_pooling``)."""
        return self.backend.norm(norm, features, self.level(stride))


def _sequential_rule(context: SparseContext, sequential: nn.Sequential, features, stride):
    for layer in sequential:
        features, stride = context.run(layer, features, stride)
    return features, stride


def _conv_rule(context: SparseContext, conv: nn.Conv3d, features, stride):
    return context.conv(conv, features, stride)


def _instance_norm_rule(context: SparseContext, norm: nn.InstanceNorm3d, features, stride):
    return context.norm(norm, features, stride), stride


def _leaky_relu_rule(context: SparseContext, activation: nn.LeakyReLU, features, stride):
    # out of place whatever the module says: the input may be a stage's output, which is returned too
    return F.leaky_relu(features, activation.negative_slope), stride


register_sparse_rule(nn.Sequential, _sequential_rule)
register_sparse_rule(nn.Conv3d, _conv_rule)
register_sparse_rule(nn.InstanceNorm3d, _instance_norm_rule)
register_sparse_rule(nn.LeakyReLU, _leaky_relu_rule)


def _check_sparse_rules(module: nn.Module, path: str) -> None:
    """Raise a missing rule at construction rather than at the first forward."""
    try:
        sparse_rule(module)
    except TypeError as err:
        raise TypeError(f"{path}: {err}") from None
    if type(module) is nn.Sequential:  # its rule runs the children by theirs
        for name, child in module.named_children():
            _check_sparse_rules(child, f"{path}.{name}")


class SparseEncoder(nn.Module):
    """The encoder of a dense CNN backbone, seeing only the visible patches (SparK's ``SparseEncoder``).

    Args:
        backbone: a :class:`~anatomask_components.networks.contract.PretrainingBackbone`. Its first
            ``num_stages`` encoder stages run here (its modules, not copies) and are kept under ``sp_cnn``
            with the backbone's own names (``sp_cnn.conv_blocks_context.*`` for STU-Net); the rest of the
            backbone is not kept.
        num_stages: encoder stages to run, the first ones (None: all).
        backend: ``"dense"`` (masked dense convolution), ``"spconv"`` (submanifold sparse convolution) or
            ``"auto"`` (per call, the faster of the two for the device and masked fraction).
        norm_pooling: ``"batch"`` pools the instance-norm statistics over the active voxels of the
            whole batch (reference); ``"sample"`` computes them per sample.

    Raises:
        TypeError: a block of the stages has no sparse rule (:func:`register_sparse_rule`).

    Forward input: ``x`` ``(B, C, H, W, D)`` and ``visible`` ``(B, 1, h, w, d)`` bool patch mask,
    where ``(H, W, D) = (h, w, d) * patch_size``; optionally ``masks``, the output of
    :meth:`visible_masks` for this ``visible`` when the caller needs them too.
    Forward output: one dense ``(B, C_i, H_i, W_i, D_i)`` feature map per stage (finest first), exactly
    zero at masked positions.
    """

    def __init__(
        self,
        backbone: PretrainingBackbone,
        num_stages: int | None = None,
        backend: Backend = "dense",
        norm_pooling: NormPooling = "batch",
    ) -> None:
        super().__init__()
        if norm_pooling not in ("batch", "sample"):
            raise ValueError(f"norm_pooling must be 'batch' or 'sample', got {norm_pooling!r}.")
        stages = backbone.encoder_stages
        num_stages = len(stages) if num_stages is None else num_stages
        if not 1 <= num_stages <= len(stages):
            raise ValueError(f"num_stages must be in [1, {len(stages)}], got {num_stages}.")
        name = next((n for n, m in backbone.named_children() if m is stages), None)
        if name is None:
            raise ValueError(
                f"{type(backbone).__name__}.encoder_stages must be an nn.ModuleList registered on the "
                "backbone itself: its name there gives the keys of the pretrained encoder."
            )
        for i, stage in enumerate(stages[:num_stages]):
            _check_sparse_rules(stage, f"{name}.{i}")
        # SparK's name for the wrapped CNN; below it the backbone's names, shared by the fine-tuning network
        self.sp_cnn = nn.Module()
        self.sp_cnn.add_module(name, stages[:num_stages])
        self.stages_name = name
        self.stage_strides = [tuple(int(v) for v in s) for s in backbone.encoder_strides[:num_stages]]
        self.widths = [int(w) for w in backbone.encoder_widths[:num_stages]]
        self.norm_pooling = norm_pooling
        self.backend = backend

    @property
    def stages(self) -> nn.ModuleList:
        """The encoder stages this encoder runs, finest first."""
        return self.sp_cnn.get_submodule(self.stages_name)

    @property
    def backend(self) -> str:
        return self._backend_name

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in ("dense", "spconv", "auto"):
            raise ValueError(f"unknown sparse backend {name!r}; choose 'dense', 'spconv' or 'auto'.")
        self._backends: dict[str, object] = {"dense": _MaskedDenseBackend(self.norm_pooling)}
        if name == "spconv":
            self._backends["spconv"] = _SpconvBackend(self.norm_pooling)
        self._backend_name = name

    def resolved_backend(self, visible: torch.Tensor) -> str:
        """The backend a call with this patch mask runs: the fixed one, or the choice of ``"auto"`` for the
        device, the pass (autograd on or off) and the masked fraction."""
        if self._backend_name != "auto":
            return self._backend_name
        rules = SPCONV_FROM_MASKED_FRACTION.get(visible.device.type, {})
        threshold = rules.get("train" if torch.is_grad_enabled() else "inference")
        if threshold is None or 1.0 - float(visible.float().mean()) < threshold - 1e-9:
            return "dense"
        if "spconv" not in self._backends:
            try:
                self._backends["spconv"] = _SpconvBackend(self.norm_pooling)
            except ImportError:
                self._backends["spconv"] = None  # not installed: dense throughout
        return "spconv" if self._backends["spconv"] is not None else "dense"

    @property
    def cumulative_strides(self) -> list[Stride]:
        """Downsampling factor of each stage's output relative to the input."""
        out, total = [], (1, 1, 1)
        for s in self.stage_strides:
            total = _strided(total, s)
            out.append(total)
        return out

    @property
    def patch_size(self) -> Stride:
        """Mask unit: the total stride of the encoder (16^3 for the 5-stage pretraining STU-Net)."""
        return self.cumulative_strides[-1]

    def visible_masks(self, visible: torch.Tensor) -> dict[Stride, torch.Tensor]:
        """The patch mask repeated to every resolution of the encoder, built once per forward.

        Args:
            visible: ``(B, 1, h, w, d)`` bool patch mask.

        Returns:
            cumulative stride (``(1, 1, 1)`` = input resolution) -> ``(B, 1, H_i, W_i, D_i)`` bool mask.
        """
        patch, masks = self.patch_size, {}
        for stride in [(1, 1, 1)] + self.cumulative_strides:
            if stride not in masks:
                masks[stride] = upsample_patch_mask(visible.bool(), [p // s for p, s in zip(patch, stride)])
        return masks

    def forward(
        self,
        x: torch.Tensor,
        visible: torch.Tensor,
        masks: dict[Stride, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        patch = self.patch_size
        grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
        if tuple(visible.shape[2:]) != grid or any(s % p for s, p in zip(x.shape[2:], patch)):
            raise ValueError(
                f"input of spatial shape {tuple(x.shape[2:])} with patch size {patch} needs a visibility "
                f"mask of shape (B, 1, *{grid}), got {tuple(visible.shape)}."
            )
        backend = self._backends[self.resolved_backend(visible)]
        context = SparseContext(backend, self.visible_masks(visible) if masks is None else masks, patch)
        stride = (1, 1, 1)
        h = backend.from_dense(x, context.level(stride))
        features = []
        for i, (stage, declared) in enumerate(zip(self.stages, self.cumulative_strides)):
            h, stride = context.run(stage, h, stride)
            if stride != declared:
                raise ValueError(f"stage {i} ends at stride {stride}; the backbone declares {declared}.")
            features.append(backend.to_dense(h, context.level(stride)))
        return features
