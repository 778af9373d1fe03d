"""Masked reconstruction loss, teacher scores and patch helpers (docs/method.md §2, §6.2 and §9)."""

from __future__ import annotations

import math

import pytest
import torch

from anatomask_components.losses import masked_patch_mse, normalize_patches, patch_scores
from anatomask_components.patches import (
    mask_to_visible_grid,
    paste_reconstruction,
    patch_grid,
    patchify,
    unpatchify,
)

EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# patch helpers


def test_patchify_raster_order_with_d_fastest():
    b, c, (p0, p1, p2), (h, w, d) = 2, 3, (2, 3, 4), (2, 3, 2)
    x = torch.randn(b, c, h * p0, w * p1, d * p2)
    patches = patchify(x, (p0, p1, p2))
    assert patches.shape == (b, h * w * d, p0 * p1 * p2 * c)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for k in range(d):
                    index = (i * w + j) * d + k  # d fastest
                    for a in range(p0):
                        for e in range(p1):
                            for f in range(p2):
                                for ch in range(c):
                                    col = ((a * p1 + e) * p2 + f) * c + ch
                                    assert (
                                        patches[n, index, col] == x[n, ch, i * p0 + a, j * p1 + e, k * p2 + f]
                                    )


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 8, 12, 4)
    patches = patchify(x, (4, 3, 2))
    assert torch.equal(unpatchify(patches, (4, 3, 2), (2, 4, 2)), x)
    p = torch.randn(1, 6, 2 * 2 * 2 * 5)
    assert torch.equal(patchify(unpatchify(p, (2, 2, 2), (1, 2, 3)), (2, 2, 2)), p)


def test_patch_grid_and_mask_to_visible_grid():
    assert patch_grid((112, 112, 128), (16, 16, 16)) == (7, 7, 8)
    with pytest.raises(ValueError):
        patch_grid((112, 112, 120), (16, 16, 16))
    mask = torch.zeros(1, 2 * 3 * 4, dtype=torch.bool)
    mask[0, 1 * 12 + 2 * 4 + 3] = True  # patch (1, 2, 3)
    visible = mask_to_visible_grid(mask, (2, 3, 4))
    assert visible.shape == (1, 1, 2, 3, 4) and visible.dtype == torch.bool
    assert not visible[0, 0, 1, 2, 3] and int(visible.sum()) == 23


# ---------------------------------------------------------------------------------------------
# normalisation and loss


def test_normalize_patches_uses_the_unbiased_variance_plus_eps():
    patches = torch.tensor([[[0.0, 1, 2, 3, 4, 5, 6, 7], [5.0] * 8]])
    out = normalize_patches(patches)
    # 0..7: mean 3.5, unbiased variance 42 / 7 = 6
    expected = (torch.arange(8.0) - 3.5) / math.sqrt(6 + EPS)
    torch.testing.assert_close(out[0, 0], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(out[0, 1], torch.zeros(8))  # constant patch: 0 / sqrt(eps)


def _hand_example():
    """1x1x4x4x4 volume, 2^3 patches (grid 2x2x2, L = 8)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 1, 4, 4, 4, generator=gen) * 5
    recon = torch.randn(1, 1, 4, 4, 4, generator=gen)
    # patch 0 = grid (0, 0, 0): voxels 0..7 in (h, w, d) order, predicted as zeros
    image[0, 0, 0:2, 0:2, 0:2] = torch.arange(8.0).reshape(2, 2, 2)
    recon[0, 0, 0:2, 0:2, 0:2] = 0.0
    # patch 1 = grid (0, 0, 1), the next along d: constant 5, predicted as 2
    image[0, 0, 0:2, 0:2, 2:4] = 5.0
    recon[0, 0, 0:2, 0:2, 2:4] = 2.0
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :2] = True
    return image, recon, mask


def test_masked_loss_equals_the_hand_computation():
    image, recon, mask = _hand_example()
    # patch 0: target (v - 3.5) / sqrt(6 + eps), prediction 0 -> mean t^2 = 42 / (8 (6 + eps))
    l0 = 42.0 / (8 * (6.0 + EPS))
    # patch 1: target 0 (constant), prediction 2 -> 4
    l1 = 4.0
    loss = masked_patch_mse(recon, image, mask, (2, 2, 2))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # a biased variance would give 0.875 -> 1.0 for patch 0: the hand value tells them apart
    assert abs(loss.item() - (1.0 + 4.0) / 2) > 0.05


def test_loss_is_the_mean_over_all_masked_patches_of_the_batch():
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, 4, 4, 4, generator=gen)
    recon = torch.randn(2, 1, 4, 4, 4, generator=gen)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [0, 3, 5]] = True
    mask[1, [6]] = True
    target = normalize_patches(patchify(image, (2, 2, 2)))
    per_patch = (patchify(recon, (2, 2, 2)) - target).square().mean(-1)
    expected = (per_patch[0, 0] + per_patch[0, 3] + per_patch[0, 5] + per_patch[1, 6]) / 4
    torch.testing.assert_close(masked_patch_mse(recon, image, mask, (2, 2, 2)), expected)


def test_visible_patches_contribute_nothing():
    image, recon, mask = _hand_example()
    recon = recon.clone().requires_grad_(True)
    loss = masked_patch_mse(recon, image, mask, (2, 2, 2))
    loss.backward()
    grad = patchify(recon.grad, (2, 2, 2))[0]
    assert torch.all(grad[2:] == 0)  # visible patches: exactly zero gradient
    assert torch.all(grad[0] != 0)  # masked patch 0: every voxel (prediction 0, target non-zero)
    # changing image or reconstruction on visible patches leaves the loss unchanged
    keep = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    keep[0, 0, 0:2, 0:2, :] = True  # patches 0 and 1
    noise = torch.randn(1, 1, 4, 4, 4) * 10
    with torch.no_grad():
        other = masked_patch_mse(
            torch.where(keep, recon, noise), torch.where(keep, image, noise), mask, (2, 2, 2)
        )
    assert torch.equal(other, loss.detach())


def test_patch_scores_raw_and_normalized():
    image, recon, _ = _hand_example()
    raw = patch_scores(recon, image, (2, 2, 2))
    assert raw.shape == (1, 8)
    assert raw[0, 0].item() == pytest.approx(sum(v * v for v in range(8)) / 8)  # 17.5
    assert raw[0, 1].item() == pytest.approx(9.0)  # (2 - 5)^2
    normalized = patch_scores(recon, image, (2, 2, 2), normalized_target=True)
    assert normalized[0, 0].item() == pytest.approx(42.0 / (8 * (6.0 + EPS)), rel=1e-6)
    assert normalized[0, 1].item() == pytest.approx(4.0)
    # every patch is scored: the mask generator decides which scores count
    per_patch = (patchify(recon, (2, 2, 2)) - patchify(image, (2, 2, 2))).square().mean(-1)
    torch.testing.assert_close(raw, per_patch)
    # the normalised score of a patch is the student's loss on that patch alone
    for j in range(8):
        one = torch.zeros(1, 8, dtype=torch.bool)
        one[0, j] = True
        torch.testing.assert_close(normalized[0, j], masked_patch_mse(recon, image, one, (2, 2, 2)))


def test_paste_reconstruction_denormalises_masked_patches_and_keeps_visible_ones():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, 4) * 3 + 5
    reconstruction = torch.randn_like(x)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    pasted = paste_reconstruction(reconstruction, x, mask, (4, 4, 4))
    pasted_patches, input_patches = patchify(pasted, (4, 4, 4)), patchify(x, (4, 4, 4))
    predicted = patchify(reconstruction, (4, 4, 4))
    for b in range(2):
        for j in range(4):
            if mask[b, j]:
                patch = input_patches[b, j]
                std = torch.sqrt(patch.var(unbiased=True) + 1e-6)
                torch.testing.assert_close(pasted_patches[b, j], predicted[b, j] * std + patch.mean())
            else:
                assert torch.equal(pasted_patches[b, j], input_patches[b, j])
