"""Masked reconstruction loss, the teacher's per-patch scores (docs/method.md §6.2 and §9), the loss of
the HPM loss predictor (docs/method.md §12.2), and the fine-tuning loss for partially labelled scans
(:class:`PartialLabelDiceCELoss`, docs/finetune.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from anatomask_components.data.partial_labels import MAX_LABEL_SETS, UNLABELLED_BASE
from anatomask_components.patches import patchify

__all__ = [
    "PartialLabelDiceCELoss",
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


class PartialLabelDiceCELoss(nn.Module):
    """Dice + cross-entropy on softmax outputs that leaves out what a partially labelled scan does not
    annotate: the marginal loss of Shi et al. 2021 ("Marginal loss and exclusion loss for partially
    supervised multi-organ segmentation").

    Target voxels hold class ids, or ``UNLABELLED_BASE + s`` where the scan annotates only the classes of
    ``label_sets[s]`` and the voxel is none of them
    (:class:`~anatomask_components.data.partial_labels.EncodeUnlabelledd`). Such a voxel may be background
    or any class outside that set, ``M = {0} + (classes not in the set)``:

    - cross-entropy: ``-log p_y`` at a class id ``y``, ``-log sum_{c in M} p_c`` at a code (the
      probabilities of ``M`` merged into one), mean over all voxels;
    - Dice (MONAI's ``DiceLoss(to_onehot_y=True, softmax=True)``): class ``c`` takes part, from scan
      ``b``, only when ``b`` annotates ``c`` (a scan without codes annotates every class and the
      background; one with codes only the classes of its set); a code voxel is "not c" for the classes
      ``b`` annotates. With ``batch=True`` the sums run over batch and space per class, and the loss is
      the mean over the classes with any taking part.

    Without codes in the target this is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, ...)`` with
    the same arguments.

    Args:
        label_sets: the dataset's table of labelled-class sets
            (:func:`~anatomask_components.data.partial_labels.partial_label_sets`).
        include_background: Dice of class 0 too (cross-entropy always covers every class).
        batch: Dice sums over the batch before the ratio (else one ratio per scan and class).
        smooth_nr: added to the Dice numerator.
        smooth_dr: added to the Dice denominator.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
    """

    def __init__(
        self,
        label_sets: Sequence[Sequence[int]] = (),
        include_background: bool = False,
        batch: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
    ):
        super().__init__()
        if len(label_sets) > MAX_LABEL_SETS:
            raise ValueError(f"at most {MAX_LABEL_SETS} label sets, got {len(label_sets)}")
        classes = [sorted({int(c) for c in s}) for s in label_sets]
        if any(not s or s[0] < 1 or s[-1] >= UNLABELLED_BASE for s in classes):
            raise ValueError(f"label sets hold foreground class ids 1..{UNLABELLED_BASE - 1}, got {classes}")
        self.label_sets = classes
        self.include_background = include_background
        self.batch = batch
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        # built once per output count and device: deep supervision calls forward once per scale each step
        self._marginal_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _marginal(self, num_classes: int, device: torch.device) -> torch.Tensor:
        """``(max(S, 1), C)`` bool, True where class ``c`` is in ``M`` of set ``s`` (a lone dummy row for no
        sets, never read)."""
        key = (num_classes, device)
        if key not in self._marginal_tables:
            self._marginal_tables[key] = self._build_marginal(num_classes).to(device)
        return self._marginal_tables[key]

    def _build_marginal(self, num_classes: int) -> torch.Tensor:
        table = torch.ones(max(len(self.label_sets), 1), num_classes, dtype=torch.bool)
        for row, classes in enumerate(self.label_sets):
            if classes[-1] >= num_classes:
                raise ValueError(f"label set {classes} names a class beyond the {num_classes} outputs")
            table[row, classes] = False
        return table

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: ``(B, 1, *spatial)`` class ids and unlabelled codes.

        Returns:
            scalar: ``lambda_dice * dice + lambda_ce * cross-entropy``.
        """
        if target.dim() != input.dim() or target.shape[1] != 1 or target.shape[2:] != input.shape[2:]:
            raise ValueError(
                f"target must be (B, 1, *spatial) for input (B, C, *spatial), got {tuple(target.shape)} "
                f"for {tuple(input.shape)}"
            )
        num_classes = input.shape[1]
        if num_classes > UNLABELLED_BASE:
            raise ValueError(f"at most {UNLABELLED_BASE} classes (ids below the codes), got {num_classes}")
        input = input.float()
        codes = target.as_subclass(torch.Tensor)[:, 0].long()  # a MetaTensor's metadata means nothing here
        unlabelled = codes >= UNLABELLED_BASE
        invalid = (codes < 0) | (codes >= UNLABELLED_BASE + len(self.label_sets))
        invalid |= ~unlabelled & (codes >= num_classes)
        if bool(invalid.any()):
            found = sorted(torch.unique(codes[invalid]).tolist())
            raise ValueError(
                f"target values {found} are neither class ids below {num_classes} nor codes of the "
                f"{len(self.label_sets)} label sets ({UNLABELLED_BASE}..)"
            )
        marginal = self._marginal(num_classes, input.device)
        set_index = codes[unlabelled] - UNLABELLED_BASE

        log_p = torch.log_softmax(input, dim=1)
        own = codes.clamp(max=num_classes - 1).unsqueeze(1)  # a stand-in at codes, masked out
        known = log_p.gather(1, own)[:, 0].masked_fill(unlabelled, 0.0)
        # an unlabelled voxel: log of the summed probability of the classes it may be, M of its set
        merged = log_p.movedim(1, -1)[unlabelled].masked_fill(~marginal[set_index], float("-inf"))
        ce = -(known.sum() + merged.logsumexp(dim=-1).sum()) / codes.numel()

        p = torch.softmax(input, dim=1)
        classes = torch.arange(num_classes, device=input.device).view(1, -1, *[1] * (input.dim() - 2))
        onehot = (codes.unsqueeze(1) == classes).to(p.dtype)  # all zero at codes: "not c" for every c
        # scan b annotates class c unless its set (a scan holds one) leaves c out
        annotated = torch.ones(input.shape[:2], dtype=torch.bool, device=input.device)
        for row in torch.unique(set_index).tolist():
            holds = (codes == UNLABELLED_BASE + row).flatten(1).any(dim=1)
            annotated &= ~(holds.unsqueeze(1) & marginal[row])
        if not self.include_background:
            p, onehot, annotated = p[:, 1:], onehot[:, 1:], annotated[:, 1:]
        spatial = list(range(2, p.dim()))
        intersection = (p * onehot).sum(spatial)
        denominator = onehot.sum(spatial) + p.sum(spatial)
        weight = annotated.to(p.dtype)
        if self.batch:
            intersection, denominator = (weight * intersection).sum(0), (weight * denominator).sum(0)
            weight = annotated.any(dim=0).to(p.dtype)
        dice = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        dice = (weight * dice).sum() / weight.sum().clamp_min(1.0)
        return self.lambda_dice * dice + self.lambda_ce * ce
