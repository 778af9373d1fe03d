"""3D patch helpers shared by the losses, the mask generators and the pretraining model.

Patch order is raster order over the patch grid ``(h, w, d)`` with ``d`` fastest, the order of
``torch.Tensor.flatten`` on a ``(h, w, d)`` grid; flattened masks use the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["patch_grid", "patchify", "unpatchify", "mask_to_visible_grid", "paste_reconstruction"]


def patch_grid(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Number of patches along each axis; raises if the shape is not a multiple of the patch size."""
    if any(s % p for s, p in zip(spatial_shape, patch_size)):
        raise ValueError(
            f"spatial shape {tuple(spatial_shape)} is not a multiple of the patch size {tuple(patch_size)}."
        )
    return tuple(int(s // p) for s, p in zip(spatial_shape, patch_size))


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut a volume into non-overlapping patches.

    Args:
        x: ``(B, C, H, W, D)``.
        patch_size: ``(p0, p1, p2)`` dividing ``(H, W, D)``.

    Returns:
        ``(B, L, p0 * p1 * p2 * C)`` with ``L = h * w * d`` in raster order (``d`` fastest).
    """
    b, c = x.shape[:2]
    h, w, d = patch_grid(x.shape[2:], patch_size)
    p0, p1, p2 = patch_size
    x = x.reshape(b, c, h, p0, w, p1, d, p2)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, h * w * d, p0 * p1 * p2 * c)


def unpatchify(patches: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``(B, L, p0 * p1 * p2 * C)``.
        patch_size: ``(p0, p1, p2)``.
        grid: ``(h, w, d)`` with ``h * w * d = L``.

    Returns:
        ``(B, C, h * p0, w * p1, d * p2)``.
    """
    b = patches.shape[0]
    h, w, d = grid
    p0, p1, p2 = patch_size
    c = patches.shape[2] // (p0 * p1 * p2)
    x = patches.reshape(b, h, w, d, p0, p1, p2, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, h * p0, w * p1, d * p2)


def mask_to_visible_grid(mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Turn a flat mask (True = masked) into a patch-grid visibility map.

    Args:
        mask: ``(B, L)`` bool, True where the patch is masked.
        grid: ``(h, w, d)``.

    Returns:
        ``(B, 1, h, w, d)`` bool, True where the patch is visible.
    """
    return (~mask.bool()).reshape(mask.shape[0], 1, *grid)


def paste_reconstruction(
    reconstruction: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch_size: Sequence[int]
) -> torch.Tensor:
    """The input with its masked patches replaced by the reconstruction, back on the input's scale.

    The decoder predicts per-patch normalised values (the training target), so each masked patch is
    de-normalised with the mean and unbiased standard deviation of the input patch it replaces.

    Args:
        reconstruction: ``(B, C, H, W, D)`` decoder output.
        x: ``(B, C, H, W, D)`` input.
        mask: ``(B, L)`` bool, True = masked.
        patch_size: the mask unit.

    Returns:
        ``(B, C, H, W, D)``: reconstructed masked patches, input elsewhere.
    """
    grid = patch_grid(x.shape[2:], patch_size)
    target = patchify(x, patch_size)
    pred = patchify(reconstruction, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    std = torch.sqrt(target.var(dim=-1, keepdim=True, unbiased=True) + 1e-6)
    return unpatchify(torch.where(mask[..., None], pred * std + mean, target), patch_size, grid)
