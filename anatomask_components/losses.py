"""Masked reconstruction loss and the teacher's per-patch scores (METHOD.md sections 2 and 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anatomask_components.patches import patchify

__all__ = ["normalize_patches", "masked_patch_mse", "patch_scores"]


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of the reconstruction target.

    Args:
        patches: ``(B, L, N)`` voxels of each patch.
        eps: added to the unbiased variance.

    Returns:
        ``(patches - mean) / sqrt(var_unbiased + eps)``, statistics per patch.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / torch.sqrt(var + eps)


def masked_patch_mse(
    reconstruction: torch.Tensor,
    image: torch.Tensor,
    mask: torch.Tensor,
    patch_size: Sequence[int],
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error against per-patch normalised targets, on masked patches only.

    Args:
        reconstruction: ``(B, C, H, W, D)`` decoder output.
        image: ``(B, C, H, W, D)`` the unmasked input.
        mask: ``(B, L)`` bool, True where the patch was masked.
        patch_size: mask unit ``(p0, p1, p2)``.
        eps: added to the unbiased variance of each target patch.

    Returns:
        scalar: sum over masked patches of the per-patch mean squared error, divided by their count.
    """
    target = normalize_patches(patchify(image.float(), patch_size), eps)
    pred = patchify(reconstruction.float(), patch_size)
    per_patch = (pred - target).square().mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def patch_scores(
    reconstruction: torch.Tensor,
    image: torch.Tensor,
    patch_size: Sequence[int],
    normalized_target: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-patch reconstruction error that the teacher uses to rank patches.

    Args:
        reconstruction: ``(B, C, H, W, D)`` teacher output.
        image: ``(B, C, H, W, D)`` the unmasked input.
        patch_size: mask unit.
        normalized_target: score against the per-patch normalised target (the student's loss) instead
            of the raw patch (reference behaviour, the default).
        eps: as in :func:`normalize_patches`.

    Returns:
        ``(B, L)`` mean squared error of each patch.
    """
    target = patchify(image.float(), patch_size)
    if normalized_target:
        target = normalize_patches(target, eps)
    return (patchify(reconstruction.float(), patch_size) - target).square().mean(dim=-1)
