"""Mask generators and masking dynamics (docs/method.md §2, §6.3 and §7).

hypothesis is not a dependency of the project, so the property tests loop over a seeded grid.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from anatomask_components.masking import (
    HardRatioSchedule,
    hardest_patches,
    num_hard,
    num_masked,
    random_patch_mask,
    reconstruction_guided_mask,
)

LENGTHS = [1, 2, 7, 8, 27, 64, 100, 392]
RATIOS = [0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.8, 0.9, 0.95]


def expected_masked(length: int, ratio: float) -> int:
    return length - round(length * (1 - ratio))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_scores(batch: int, length: int, seed: int) -> torch.Tensor:
    """Scores without ties: a random permutation of distinct values per row."""
    g = gen(seed)
    return torch.stack([torch.randperm(length, generator=g).float() * 0.1 + 0.05 for _ in range(batch)])


def topk_set(values: torch.Tensor, allowed: torch.Tensor, k: int, lowest: bool = False) -> set[int]:
    """Indices of the k largest (or smallest) values among `allowed`, by sorting in Python."""
    idx = [i for i in range(len(values)) if allowed[i]]
    idx.sort(key=lambda i: float(values[i]), reverse=not lowest)
    return set(idx[:k])


# ---------------------------------------------------------------------------------------------
# counts


def test_num_masked_and_num_hard():
    assert num_masked(392, 0.6) == 235  # 157 visible
    assert num_masked(392, 0.8) == 392 - round(392 * 0.2)
    assert num_masked(392, 0.9) == 392 - 39
    assert num_masked(10, 0.0) == 0
    with pytest.raises(ValueError):
        num_masked(10, 1.0)
    assert num_hard(235, 0.5) == 117
    assert num_hard(235, 0.0) == 0
    assert num_hard(235, 1.0) == 235
    assert num_hard(100, 0.29) == 29  # floor of the decimal product, not of 28.999999999999996
    with pytest.raises(ValueError):
        num_hard(10, 1.5)


def test_random_patch_mask_exact_counts_over_shapes_ratios_and_seeds():
    for seed, (length, ratio) in enumerate(itertools.product(LENGTHS, RATIOS)):
        batch = 1 + seed % 4
        mask = random_patch_mask(batch, length, ratio, generator=gen(seed))
        assert mask.shape == (batch, length) and mask.dtype == torch.bool
        assert mask.sum(dim=1).tolist() == [expected_masked(length, ratio)] * batch, (length, ratio)
    assert random_patch_mask(4, 392, 0.6, generator=gen(0)).sum(dim=1).tolist() == [235] * 4


def test_random_patch_mask_is_reproducible_and_random():
    a = random_patch_mask(4, 392, 0.6, generator=gen(1))
    assert torch.equal(a, random_patch_mask(4, 392, 0.6, generator=gen(1)))
    assert not torch.equal(a, random_patch_mask(4, 392, 0.6, generator=gen(2)))
    assert len({tuple(row.tolist()) for row in a}) == 4  # rows differ
    # uniform: each patch is masked about n_masked / L of the time
    many = random_patch_mask(4000, 20, 0.6, generator=gen(3)).float().mean(dim=0)
    p = 12 / 20
    assert torch.all((many - p).abs() < 5 * math.sqrt(p * (1 - p) / 4000))


# ---------------------------------------------------------------------------------------------
# reconstruction-guided mask


def _guided_cases():
    rng = random.Random(0)
    for case in range(60):
        length = rng.choice([8, 27, 64, 100, 392])
        ratio = rng.choice([0.5, 0.6, 0.75, 0.8, 0.9])
        hard_ratio = rng.choice([0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0])
        lowest = rng.random() < 0.3
        yield case, length, ratio, hard_ratio, lowest


def test_guided_mask_contract_over_a_seeded_grid():
    for case, length, ratio, hard_ratio, lowest in _guided_cases():
        batch = 1 + case % 3
        n_masked = expected_masked(length, ratio)
        k = math.floor(n_masked * hard_ratio + 1e-9)
        scores = distinct_scores(batch, length, case)
        # candidates: the teacher's own random mask (n_masked patches), as in the engine
        candidates = random_patch_mask(batch, length, ratio, generator=gen(1000 + case))
        scores = scores * candidates  # teacher-visible patches score 0, as in the reference
        mask = reconstruction_guided_mask(
            scores, ratio, hard_ratio, candidates=candidates, lowest=lowest, generator=gen(case)
        )
        assert mask.shape == (batch, length) and mask.dtype == torch.bool
        assert mask.sum(dim=1).tolist() == [n_masked] * batch, (length, ratio, hard_ratio)
        for b in range(batch):
            hard = topk_set(scores[b], candidates[b], k, lowest)
            assert len(hard) == k
            chosen = set(torch.nonzero(mask[b]).flatten().tolist())
            assert hard <= chosen, (case, b)
        if k == n_masked:
            # every masked patch is chosen by score: exactly the top-k candidates, nothing else
            expected = torch.zeros_like(mask)
            for b in range(batch):
                expected[b, list(topk_set(scores[b], candidates[b], k, lowest))] = True
            assert torch.equal(mask, expected)


def test_hardest_patches_are_the_top_k_candidates_that_the_guided_mask_holds():
    for case, length, ratio, hard_ratio, lowest in _guided_cases():
        batch = 1 + case % 3
        k = math.floor(expected_masked(length, ratio) * hard_ratio + 1e-9)
        candidates = random_patch_mask(batch, length, ratio, generator=gen(1000 + case))
        scores = distinct_scores(batch, length, case) * candidates
        hard = hardest_patches(scores, k, candidates=candidates, lowest=lowest)
        for b in range(batch):
            assert set(torch.nonzero(hard[b]).flatten().tolist()) == topk_set(
                scores[b], candidates[b], k, lowest
            )
        mask = reconstruction_guided_mask(
            scores, ratio, hard_ratio, candidates=candidates, lowest=lowest, generator=gen(case)
        )
        assert torch.equal(mask & hard, hard)
    scores = distinct_scores(1, 8, 0)
    assert set(torch.nonzero(hardest_patches(scores, 3)[0]).flatten().tolist()) == topk_set(
        scores[0], torch.ones(8, dtype=torch.bool), 3
    )
    few = torch.zeros(1, 8, dtype=torch.bool)
    few[0, :2] = True
    with pytest.raises(ValueError, match="only 2 candidates"):
        hardest_patches(scores, 3, candidates=few)


def test_full_hard_ratio_gives_exactly_the_top_or_bottom_candidates():
    length, ratio = 20, 0.5  # n_masked = 10
    scores = distinct_scores(1, length, 0)[0]
    candidates = torch.zeros(length, dtype=torch.bool)
    candidates[:12] = True
    # non-candidates get the most extreme scores in both directions: they must still never be hard
    scores[12:16] = 100.0 + torch.arange(4.0)
    scores[16:] = -100.0 - torch.arange(4.0)
    for lowest in (False, True):
        mask = reconstruction_guided_mask(
            scores[None], ratio, 1.0, candidates=candidates[None], lowest=lowest, generator=gen(0)
        )[0]
        expected = topk_set(scores, candidates, 10, lowest)
        assert set(torch.nonzero(mask).flatten().tolist()) == expected
        assert not mask[12:].any()
    # without candidates every patch may be chosen
    mask = reconstruction_guided_mask(scores[None], ratio, 1.0, generator=gen(0))[0]
    assert set(torch.nonzero(mask).flatten().tolist()) == set(range(12, 16)) | topk_set(
        scores, torch.ones(length, dtype=torch.bool), 10
    )


def test_low_significance_never_picks_teacher_visible_patches():
    """Teacher-visible patches score 0, the lowest possible: lowest=True must still skip them."""
    length, ratio = 64, 0.6
    candidates = random_patch_mask(3, length, ratio, generator=gen(7))
    scores = (torch.rand(3, length, generator=gen(8)) + 0.1) * candidates
    n_masked = expected_masked(length, ratio)
    k = math.floor(n_masked * 0.5)
    mask = reconstruction_guided_mask(
        scores, ratio, 0.5, candidates=candidates, lowest=True, generator=gen(9)
    )
    for b in range(3):
        bottom = topk_set(scores[b], candidates[b], k, lowest=True)
        assert all(candidates[b, i] for i in bottom)
        assert bottom <= set(torch.nonzero(mask[b]).flatten().tolist())
    assert mask.sum(dim=1).tolist() == [n_masked] * 3


def test_remainder_is_drawn_uniformly_from_all_non_hard_patches():
    length, ratio, hard_ratio, draws = 30, 0.5, 0.4, 3000  # n_masked 15, k 6, remainder 9 of 24
    candidates = torch.zeros(length, dtype=torch.bool)
    candidates[::2] = True  # 15 candidates
    scores = distinct_scores(1, length, 3)[0] * candidates
    hard = topk_set(scores, candidates, 6)
    masks = reconstruction_guided_mask(
        scores.expand(draws, length),
        ratio,
        hard_ratio,
        candidates=candidates.expand(draws, length),
        generator=gen(11),
    )
    freq = masks.float().mean(dim=0)
    assert torch.all(freq[list(hard)] == 1.0)
    others = [i for i in range(length) if i not in hard]
    # every non-hard patch (teacher-visible or not, candidate or not) is drawn, about 9 / 24 of the time
    assert masks[:, others].any(dim=0).all()
    p = 9 / 24
    assert torch.all((freq[others] - p).abs() < 5 * math.sqrt(p * (1 - p) / draws))


def test_zero_hard_ratio_gives_a_random_mask_independent_of_scores():
    length, ratio = 64, 0.75
    scores_a = distinct_scores(4, length, 0)
    scores_b = distinct_scores(4, length, 1)
    mask_a = reconstruction_guided_mask(scores_a, ratio, 0.0, generator=gen(5))
    mask_b = reconstruction_guided_mask(scores_b, ratio, 0.0, generator=gen(5))
    assert torch.equal(mask_a, mask_b)
    assert mask_a.sum(dim=1).tolist() == [48] * 4
    # not the top-scoring patches
    top = torch.zeros_like(mask_a).scatter_(1, scores_a.topk(48, dim=1).indices, True)
    assert not torch.equal(mask_a, top)
    # k = floor(n_masked * r) = 0 also for small positive ratios
    assert torch.equal(reconstruction_guided_mask(scores_a, ratio, 0.01, generator=gen(5)), mask_a)


def test_guided_mask_reproducibility_and_errors():
    scores = distinct_scores(2, 392, 0)
    candidates = random_patch_mask(2, 392, 0.6, generator=gen(0))
    kwargs = {"candidates": candidates}
    a = reconstruction_guided_mask(scores, 0.6, 0.3, generator=gen(1), **kwargs)
    assert torch.equal(a, reconstruction_guided_mask(scores, 0.6, 0.3, generator=gen(1), **kwargs))
    assert not torch.equal(a, reconstruction_guided_mask(scores, 0.6, 0.3, generator=gen(2), **kwargs))
    few = torch.zeros(2, 392, dtype=torch.bool)
    few[:, :10] = True
    with pytest.raises(ValueError):  # k = 117 hard patches but only 10 candidates
        reconstruction_guided_mask(scores, 0.6, 0.5, candidates=few, generator=gen(1))


# ---------------------------------------------------------------------------------------------
# schedule


def test_paper_schedule():
    s = HardRatioSchedule(total_epochs=100)  # r0 = 0, rT = 0.5, paper form
    assert s(0) == 0.0
    assert s(50) == pytest.approx(0.25)
    assert s(99) == pytest.approx(0.495)
    s = HardRatioSchedule(total_epochs=100, start=0.1, end=0.3)
    assert s(0) == pytest.approx(0.1) and s(50) == pytest.approx(0.2) and s(99) == pytest.approx(0.298)


def test_reference_schedule():
    s = HardRatioSchedule(total_epochs=100, form="reference")  # 0.5 (t + 1) / (T - 1), clipped
    assert s(0) == pytest.approx(0.5 / 99)
    assert s(49) == pytest.approx(0.5 * 50 / 99)
    assert s(98) == pytest.approx(0.5)
    assert s(99) == pytest.approx(0.5)  # 0.5 * 100 / 99, clipped
    assert max(s(t) for t in range(100)) <= 0.5


def test_hard_to_easy_schedule():
    s = HardRatioSchedule(total_epochs=100, start=0.5, end=0.0)
    assert s(0) == pytest.approx(0.5) and s(50) == pytest.approx(0.25) and s(99) == pytest.approx(0.005)
    r = HardRatioSchedule(total_epochs=100, start=0.5, end=0.0, form="reference")
    assert r(0) == pytest.approx(0.5 - 0.5 / 99)
    assert r(99) == 0.0  # clipped at the end value
    values = [r(t) for t in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_per_iteration_schedule():
    s = HardRatioSchedule(total_epochs=10, per_iteration=True)
    assert s(3, iteration_in_epoch=0, epoch_length=4) == pytest.approx(0.15)
    assert s(3, iteration_in_epoch=2, epoch_length=4) == pytest.approx(0.5 * 3.5 / 10)
    per_epoch = HardRatioSchedule(total_epochs=10)
    assert per_epoch(3, iteration_in_epoch=2, epoch_length=4) == pytest.approx(0.15)
    values = [s(e, i, 4) for e in range(10) for i in range(4)]
    assert all(a < b for a, b in zip(values, values[1:]))  # rises every iteration
    with pytest.raises(ValueError):
        HardRatioSchedule(total_epochs=0)
    with pytest.raises(ValueError):
        HardRatioSchedule(total_epochs=10, form="cosine")
