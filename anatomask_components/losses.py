"""Masked reconstruction loss, the teacher's per-patch scores (docs/method.md §6.2 and §9) and the loss of
the HPM loss predictor (docs/method.md §12.2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from anatomask_components.patches import patchify

__all__ = [
    "loss_prediction_loss",
    "masked_mean",
    "masked_patch_mse",
    "normalize_patches",
    "patch_scores",
]

LossPredictionKind = Literal["relative", "absolute"]


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


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-patch values over the masked patches of the whole batch.

    Args:
        per_patch: ``(B, L)`` values.
        mask: ``(B, L)`` bool, True where the patch was masked.

    Returns:
        scalar: sum over masked patches divided by their count (0 when nothing is masked).
    """
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


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
    return masked_mean(patch_scores(reconstruction, image, patch_size, normalized_target=True, eps=eps), mask)


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


def loss_prediction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    kind: LossPredictionKind = "relative",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Loss of HPM's loss predictor against the masked patches' reconstruction losses (docs/method.md §12.2).

    ``"relative"`` (HPM's default) learns the order of the losses: for every ordered pair ``(i, j)`` of
    masked patches of one image whose target losses differ, binary cross-entropy of
    ``sigmoid(pred_j - pred_i)`` against ``[loss_j > loss_i]``; pairs with equal losses (ties, and
    ``i = j``) are skipped, and the mean is over the valid pairs of the batch. Both orders of a pair give
    the same term, so this equals the mean over unordered pairs. It is computed from logits
    (``logsigmoid``), which is HPM's ``-log(sigmoid(d) + 1e-6)`` without the 1e-6 guard.

    ``"absolute"`` regresses the losses: mean squared error against the per-image z-scored losses
    ``(loss - mean) / sqrt(var_unbiased + eps)``, statistics over the image's masked patches, averaged
    over the masked patches of the batch.

    Args:
        prediction: ``(B, L)`` predicted loss of every patch.
        target: ``(B, L)`` per-patch reconstruction loss (detached: the predictor must not move it).
        mask: ``(B, L)`` bool, True where the patch was masked; only masked patches count.
        kind: ``"relative"`` or ``"absolute"``.
        eps: added to the variance in ``"absolute"``.

    Returns:
        scalar loss (0 when there is no valid pair or masked patch).
    """
    prediction, target, mask = prediction.float(), target.detach().float(), mask.bool()
    if kind == "relative":
        # [b, i, j] holds pair (i, j): logit pred_j - pred_i, label loss_j > loss_i
        logits = prediction.unsqueeze(1) - prediction.unsqueeze(2)
        later, earlier = target.unsqueeze(1), target.unsqueeze(2)
        valid = (mask.unsqueeze(1) & mask.unsqueeze(2) & (later != earlier)).float()
        terms = F.binary_cross_entropy_with_logits(logits, (later > earlier).float(), reduction="none")
        return (terms * valid).sum() / valid.sum().clamp_min(1.0)
    if kind == "absolute":
        weight = mask.float()
        count = weight.sum(dim=1, keepdim=True)
        mean = (target * weight).sum(dim=1, keepdim=True) / count.clamp_min(1.0)
        var = ((target - mean).square() * weight).sum(dim=1, keepdim=True) / (count - 1.0).clamp_min(1.0)
        z = (target - mean) / torch.sqrt(var + eps)
        return masked_mean((prediction - z).square(), mask)
    raise ValueError(f"kind must be 'relative' or 'absolute', got {kind!r}.")
