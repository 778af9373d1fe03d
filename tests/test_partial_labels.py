"""PartialLabelDiceCELoss: MONAI's DiceCELoss on fully labelled targets, the marginal loss on unlabelled
codes (anatomask_components/losses.py, docs/finetune.md "Partially labelled scans")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss

from anatomask_components.data.partial_labels import UNLABELLED_BASE
from anatomask_components.losses import PartialLabelDiceCELoss

SETTINGS = {"batch": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5}


def _monai(include_background: bool = False) -> DiceCELoss:
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background, **SETTINGS)


@pytest.mark.parametrize("shape", [(2, 5, 8, 8, 8), (3, 3, 6, 7, 5), (1, 4, 10, 9)])
@pytest.mark.parametrize("include_background", [False, True])
def test_without_codes_it_is_monai_dice_ce(shape, include_background):
    generator = torch.Generator().manual_seed(sum(shape))
    logits = 3.0 * torch.randn(shape, generator=generator)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator).float()
    ours = PartialLabelDiceCELoss([[1], [1, 2]], include_background=include_background, **SETTINGS)
    torch.testing.assert_close(
        ours(logits, target), _monai(include_background)(logits, target), rtol=0, atol=1e-6
    )


def test_without_codes_it_is_monai_dice_ce_under_deep_supervision():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 1, 16, 16, 8), generator=generator).float()
    predictions = [
        torch.randn(2, 4, 16 // 2**i, 16 // 2**i, 8 // 2**i, generator=generator) for i in range(3)
    ]
    weights = [4 / 7, 2 / 7, 1 / 7]
    ours = DeepSupervisionLoss(PartialLabelDiceCELoss([[2]], **SETTINGS), weights=weights)
    reference = DeepSupervisionLoss(_monai(), weights=weights)
    torch.testing.assert_close(ours(predictions, target), reference(predictions, target), rtol=0, atol=1e-6)


def test_deep_supervision_downsampling_keeps_the_codes():
    """DeepSupervisionLoss resizes the target with nearest-exact interpolation: values are picked, never
    blended, so a code stays a code (a blend of 0 and 130 would be a class id)."""
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (1, 1, 16, 16, 8), generator=generator).float()
    target[target == 0] = UNLABELLED_BASE + 1
    assert DeepSupervisionLoss(PartialLabelDiceCELoss()).interp_mode == "nearest-exact"
    for size in [(8, 8, 4), (4, 4, 2), (5, 7, 3)]:
        resized = F.interpolate(target, size=size, mode="nearest-exact")
        assert set(resized.unique().tolist()) <= set(target.unique().tolist())
    predictions = [torch.randn(1, 4, 16 // 2**i, 16 // 2**i, 8 // 2**i) for i in range(3)]
    loss = DeepSupervisionLoss(PartialLabelDiceCELoss([[1], [1, 3]]))(predictions, target)
    assert torch.isfinite(loss)


def _logits(probabilities: list[float]) -> torch.Tensor:
    """(1, C, 1, 1, 1) logits of a single voxel with these class probabilities."""
    return torch.tensor(probabilities).log().view(1, -1, 1, 1, 1)


def test_cross_entropy_merges_background_and_the_classes_a_scan_does_not_label():
    """Class 2 only is labelled: an unlabelled voxel is background or class 1 or 3, so moving probability
    between those leaves the loss as it is, and moving it into class 2 raises it."""
    ce = PartialLabelDiceCELoss([[2]], lambda_dice=0.0)
    code = torch.full((1, 1, 1, 1, 1), float(UNLABELLED_BASE))
    start = ce(_logits([0.4, 0.3, 0.1, 0.2]), code)
    torch.testing.assert_close(start, -torch.tensor(0.9).log())
    torch.testing.assert_close(ce(_logits([0.2, 0.5, 0.1, 0.2]), code), start)  # background -> class 1
    torch.testing.assert_close(ce(_logits([0.4, 0.0001, 0.1, 0.4999]), code), start)  # class 1 -> class 3
    assert ce(_logits([0.2, 0.3, 0.3, 0.2]), code) > start + 0.2  # background -> the labelled class 2
    # a labelled voxel is plain cross-entropy
    torch.testing.assert_close(
        ce(_logits([0.4, 0.3, 0.1, 0.2]), torch.full_like(code, 2.0)), -torch.tensor(0.1).log()
    )


def test_a_partial_case_ignores_how_probability_is_split_among_what_it_does_not_label():
    """Only class 2 labelled: permuting the logits of background, 1 and 3 at every voxel changes neither
    term; for the same label map read as fully labelled it does."""
    generator = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 4, (1, 1, 8, 8, 6), generator=generator)
    partial = torch.where(raw == 2, 2, UNLABELLED_BASE).float()
    logits = torch.randn(1, 4, 8, 8, 6, generator=generator)
    permuted = logits[:, [3, 0, 2, 1]]  # background, 1 and 3 trade places; 2 stays
    for include_background in (False, True):
        loss = PartialLabelDiceCELoss([[2]], include_background=include_background)
        torch.testing.assert_close(loss(permuted, partial), loss(logits, partial), rtol=0, atol=1e-6)
        full = torch.where(raw == 2, 2, 0).float()
        assert abs(float(loss(permuted, full) - loss(logits, full))) > 1e-3


def test_a_batch_of_a_full_and_a_partial_case():
    """Class 1 only is labelled in the second case: its classes 2 and 3 and its background leave the Dice,
    its unlabelled voxels count as "not 1" for class 1, and its cross-entropy merges 0, 2 and 3."""
    generator = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 4, (2, 1, 6, 6, 4), generator=generator)
    target = raw.clone().float()
    target[1][raw[1] != 1] = UNLABELLED_BASE
    logits = torch.randn(2, 4, 6, 6, 4, generator=generator, requires_grad=True)
    log_p = torch.log_softmax(logits, dim=1)

    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, reduction="none", **SETTINGS)
    as_background = torch.where(target >= UNLABELLED_BASE, 0.0, target)  # "not 1" for class 1
    per_class = [dice(logits, as_background).flatten()[0]]  # class 1 from both cases
    per_class += list(dice(logits[:1], target[:1]).flatten()[1:])  # classes 2 and 3 from the full case
    merged = torch.logsumexp(log_p[1, [0, 2, 3]], dim=0)
    voxel_ce = torch.stack(
        [-log_p[0].gather(0, raw[0].long())[0], torch.where(raw[1, 0] == 1, -log_p[1, 1], -merged)]
    )
    expected = torch.stack(per_class).mean() + voxel_ce.mean()

    loss = PartialLabelDiceCELoss([[1]], **SETTINGS)(logits, target)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_the_dice_of_a_class_no_case_labels_is_left_out():
    """Both cases label class 1 only: the Dice is class 1's alone (not a mean with 0 terms)."""
    generator = torch.Generator().manual_seed(4)
    raw = torch.randint(0, 3, (2, 1, 6, 6, 4), generator=generator)
    target = torch.where(raw == 1, 1, UNLABELLED_BASE).float()
    logits = torch.randn(2, 3, 6, 6, 4, generator=generator)
    dice_only = PartialLabelDiceCELoss([[1]], lambda_ce=0.0, **SETTINGS)(logits, target)
    reference = DiceLoss(
        to_onehot_y=True, softmax=True, include_background=False, reduction="none", **SETTINGS
    )
    expected = reference(logits, torch.where(raw == 1, 1, 0).float()).flatten()[0]
    torch.testing.assert_close(dice_only, expected, rtol=0, atol=1e-6)


def test_gradients_flow_through_both_terms():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2] = 2
    target[..., 2:] = UNLABELLED_BASE
    for terms in ({"lambda_ce": 0.0}, {"lambda_dice": 0.0}):
        logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
        PartialLabelDiceCELoss([[2]], **terms)(logits, target).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # at an unlabelled voxel cross-entropy scales background and class 1 alike (their gradient is
    # proportional to their probability): it moves mass out of class 2, never between them
    p = torch.softmax(logits, dim=1).detach()[0, :, ..., 2:]
    ratio = logits.grad[0, [0, 1], ..., 2:] / p[[0, 1]]
    torch.testing.assert_close(ratio[0], ratio[1])


def test_values_outside_classes_and_codes_are_refused():
    logits = torch.randn(1, 3, 2, 2, 2)
    loss = PartialLabelDiceCELoss([[1]])
    with pytest.raises(ValueError, match=r"\[3\]"):
        loss(logits, torch.full((1, 1, 2, 2, 2), 3.0))
    with pytest.raises(ValueError, match=r"\[129\]"):
        loss(logits, torch.full((1, 1, 2, 2, 2), float(UNLABELLED_BASE + 1)))
    with pytest.raises(ValueError, match="foreground class ids"):
        PartialLabelDiceCELoss([[0, 1]])
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        loss(logits, torch.zeros(1, 3, 2, 2, 2))
