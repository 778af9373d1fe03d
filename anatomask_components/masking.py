"""Mask generators and the easy-to-hard masking dynamics (docs/method.md §2, §6.3 and §7).

Masks are bool tensors of shape ``(B, L)``, True = masked, over the patch grid in raster order. All
generators are vectorised on the tensors' device and reproducible with a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "HardRatioSchedule",
    "hardest_patches",
    "num_hard",
    "num_masked",
    "random_patch_mask",
    "reconstruction_guided_mask",
]

# guards floor(n * r) against products such as 100 * 0.29 = 28.999999999999996
_FLOOR_TOLERANCE = 1e-9


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """``L - round(L * (1 - mask_ratio))``: 235 of 392 patches at ratio 0.6."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    return num_patches - round(num_patches * (1.0 - mask_ratio))


def num_hard(n_masked: int, hard_ratio: float) -> int:
    """``floor(n_masked * hard_ratio)``: the number of patches the teacher chooses."""
    if not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio must be in [0, 1], got {hard_ratio}.")
    return math.floor(n_masked * hard_ratio + _FLOOR_TOLERANCE)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _mask_from_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, values.topk(k, dim=1).indices, True)
    return mask


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random mask with exactly ``num_masked(num_patches, mask_ratio)`` True per row.

    Returns:
        ``(batch_size, num_patches)`` bool, True = masked.
    """
    noise = _uniform((batch_size, num_patches), generator, device)
    return _mask_from_topk(noise, num_masked(num_patches, mask_ratio))


def hardest_patches(
    scores: torch.Tensor,
    k: int,
    *,
    candidates: torch.Tensor | None = None,
    lowest: bool = False,
) -> torch.Tensor:
    """The ``k`` top-scoring candidates of each row: the teacher's choice of hard patches.

    Args:
        scores: ``(B, L)`` per-patch scores, higher = harder.
        k: patches chosen per row.
        candidates: ``(B, L)`` bool, the patches that may be chosen (those the teacher reconstructed, i.e.
            masked in its input); all patches if None.
        lowest: choose the lowest scores instead (the paper's "low significance" ablation).

    Returns:
        ``(B, L)`` bool, True = chosen: exactly ``k`` per row.

    Raises:
        ValueError: a row has fewer than ``k`` candidates.
    """
    ranked = scores.float() if not lowest else -scores.float()
    if candidates is not None:
        candidates = candidates.bool()
        n_candidates = int(candidates.sum(dim=1).min())
        if k > n_candidates:
            raise ValueError(f"{k} hard patches requested but a sample has only {n_candidates} candidates.")
        ranked = ranked.masked_fill(~candidates, float("-inf"))
    return _mask_from_topk(ranked, k)


def reconstruction_guided_mask(
    scores: torch.Tensor,
    mask_ratio: float,
    hard_ratio: float,
    *,
    candidates: torch.Tensor | None = None,
    lowest: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """AnatoMask's self-masking: mask the hardest patches, fill the rest at random.

    Args:
        scores: ``(B, L)`` per-patch scores, higher = harder (the teacher's reconstruction error).
        mask_ratio: fraction of patches to mask; ``n_masked = L - round(L * (1 - mask_ratio))``.
        hard_ratio: ``r_t``; ``k = floor(n_masked * r_t)`` patches are chosen by score
            (:func:`hardest_patches`).
        candidates: ``(B, L)`` bool, the patches that may be chosen by score (those the teacher
            reconstructed, i.e. masked in its input); all patches if None.
        lowest: choose the lowest scores instead (the paper's "low significance" ablation).
        generator: random source for the remaining ``n_masked - k`` patches.

    Returns:
        ``(B, L)`` bool, True = masked: exactly ``n_masked`` per row, of which the ``k`` top-scoring
        candidates, the others uniform among the patches that are not hard. ``k = 0`` gives a fresh
        random mask.
    """
    b, length = scores.shape
    n_masked = num_masked(length, mask_ratio)
    k = num_hard(n_masked, hard_ratio)
    hard = hardest_patches(scores, k, candidates=candidates, lowest=lowest)
    noise = _uniform((b, length), generator, scores.device).masked_fill(hard, float("-inf"))
    return hard | _mask_from_topk(noise, n_masked - k)


@dataclass
class HardRatioSchedule:
    """Masking dynamics ``r_t``: the fraction of masked patches chosen by the teacher.

    Args:
        total_epochs: ``T``.
        start: ``r_0`` (0 in the paper).
        end: ``r_T`` (0.5 in the paper); ``start > end`` gives the hard-to-easy ablation.
        form: ``"paper"``: ``r_0 + (t / T) (r_T - r_0)`` (Eq. 3); ``"reference"``: the released code's
            ``r_0 + (r_T - r_0) (t + 1) / (T - 1)``, clipped to ``[min(r_0, r_T), max(r_0, r_T)]``.
        per_iteration: use a fractional epoch ``t = epoch + iteration_in_epoch / epoch_length``
            instead of stepping once per epoch.
    """

    total_epochs: int
    start: float = 0.0
    end: float = 0.5
    form: Literal["paper", "reference"] = "paper"
    per_iteration: bool = False

    def __post_init__(self) -> None:
        if self.total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {self.total_epochs}.")
        if self.form not in ("paper", "reference"):
            raise ValueError(f"form must be 'paper' or 'reference', got {self.form!r}.")

    def __call__(self, epoch: int, iteration_in_epoch: int = 0, epoch_length: int = 1) -> float:
        """``r_t`` for a 0-based epoch (and 0-based iteration within it when ``per_iteration``)."""
        t = float(epoch)
        if self.per_iteration:
            t += iteration_in_epoch / max(epoch_length, 1)
        lo, hi = min(self.start, self.end), max(self.start, self.end)
        if self.form == "paper":
            r = self.start + (t / self.total_epochs) * (self.end - self.start)
        else:
            r = self.start + (self.end - self.start) * (t + 1) / max(self.total_epochs - 1, 1)
        return min(max(r, lo), hi)
