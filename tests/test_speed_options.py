"""The speed levers of the pretraining step change how it is computed, not what (issue: speed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pretrain_common import TINY_STUNET, guided_iteration, iteration_engine

from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.masking import HardRatioSchedule, num_hard, num_masked, random_patch_mask
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.networks.sparse import SPCONV_FROM_MASKED_FRACTION
from anatomask_components.patches import mask_to_visible_grid, patch_grid
from anatomask_components.strategies import RandomMasking, TeacherReconstructionMasking
from anatomask_components.teacher import EMATeacher

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _setup(channels_last: bool, teacher_precision: str = "fp32", seed: int = 0):
    torch.manual_seed(seed)
    student = AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET))
    teacher = EMATeacher(student)
    step = guided_iteration(teacher, {"precision": teacher_precision}, channels_last=channels_last, seed=seed)
    return step, teacher, iteration_engine(student, fused=True)


def _train(channels_last: bool, iterations: int = 3):
    step, teacher, engine = _setup(channels_last)
    masks, losses = [], []
    engine.network.register_forward_pre_hook(lambda m, args: masks.append(args[1].clone()))
    gen = torch.Generator().manual_seed(1)
    for i in range(1, iterations + 1):
        engine.state.iteration = i
        losses.append(float(step(engine, {"image": torch.randn(2, 1, 32, 32, 32, generator=gen)})["loss"]))
        teacher(engine)
    return losses, masks, engine.network, teacher.teacher


def test_channels_last_computes_the_same_training():
    losses_cl, masks_cl, student_cl, teacher_cl = _train(channels_last=True)
    losses, masks, student, teacher = _train(channels_last=False)
    # the same masks (the teacher's choice included) and the same losses, up to the order of float sums
    assert all(torch.equal(a, b) for a, b in zip(masks_cl, masks))
    assert losses_cl == pytest.approx(losses, rel=1e-4)
    conv = student_cl.sparse_encoder.sp_cnn.conv_blocks_context[1][0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    upsample = teacher_cl.dense_decoder.dec[0].up_sample.weight
    assert upsample.is_contiguous(memory_format=torch.channels_last_3d)
    assert student.sparse_encoder.sp_cnn.conv_blocks_context[1][0].conv1.weight.is_contiguous()
    # the gradients of a first step, from identical weights (after a few AdamW steps the weights differ by
    # its sign-like updates of near-zero gradients, which amplify rounding)
    _, _, student_cl, _ = _train(channels_last=True, iterations=1)
    _, _, student, _ = _train(channels_last=False, iterations=1)
    for (name, a), b in zip(student_cl.named_parameters(), student.parameters()):
        if name.endswith(("conv1.bias", "conv2.bias")) and "sp_cnn" in name:
            continue  # a bias right before an instance norm has an exact gradient of zero: rounding only
        # fp32 rounding at initialisation, where the reconstruction is near zero, moves them by about 0.1 %;
        # a layout mistake would move them by order one
        assert (a.grad - b.grad).norm() <= 1e-2 * b.grad.norm(), name


def test_the_teachers_mask_is_an_ordinary_tensor_with_exact_counts():
    step, teacher, engine = _setup(channels_last=True)
    x = torch.randn(2, 1, 32, 32, 32)
    length = engine.network.num_patches(x.shape[2:])
    m0 = torch.zeros(2, length, dtype=torch.bool)
    m0[:, : num_masked(length, 0.6)] = True
    mask = step.masking(x, engine.network, m0, 0.5, torch.Generator().manual_seed(0))
    assert not torch.is_inference(mask)  # the teacher ran in inference mode; its mask feeds autograd code
    assert mask.sum(dim=1).tolist() == [num_masked(length, 0.6)] * 2


def test_a_bf16_teacher_is_an_option_with_exact_counts():
    step, teacher, engine = _setup(channels_last=True, teacher_precision="bf16")
    assert step.masking.precision == "bf16" and step.precision == "fp32"
    calls = []
    teacher.teacher.register_forward_hook(lambda m, args, out: calls.append(out.dtype))
    output = step(engine, {"image": torch.randn(2, 1, 32, 32, 32)})
    assert calls == [torch.bfloat16]  # the teacher's pass ran under bf16 autocast, the student's did not
    assert output["num_hard"] == num_hard(num_masked(64, 0.6), 0.5)
    with pytest.raises(ValueError, match="teacher's precision"):
        TeacherReconstructionMasking(teacher, HardRatioSchedule(total_epochs=1), 0.6, precision="int8")
    with pytest.raises(ValueError, match="precision"):
        AnatoMaskIteration(RandomMasking(0.6), precision="int8")


def test_the_per_sample_mask_loop_of_the_benchmark_chooses_what_the_generator_chooses():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from mask_generation import per_sample_guided_masks, per_sample_random_masks
    finally:
        sys.path.remove(str(BENCHMARKS))
    import numpy as np

    from anatomask_components.masking import reconstruction_guided_mask

    rng = np.random.default_rng(0)
    scores = torch.rand(8, 392, generator=torch.Generator().manual_seed(0))
    candidates = per_sample_random_masks(8, 392, rng)
    n_masked, k = num_masked(392, 0.6), num_hard(num_masked(392, 0.6), 0.5)
    assert (n_masked, k) == (235, 117)
    assert candidates.sum(dim=1).tolist() == [n_masked] * 8
    loop = per_sample_guided_masks(scores, candidates, rng)
    fast = reconstruction_guided_mask(scores, 0.6, 0.5, candidates=candidates, generator=torch.Generator())
    hard = torch.zeros_like(candidates).scatter_(
        1, scores.masked_fill(~candidates, float("-inf")).topk(k, dim=1).indices, True
    )
    for mask in (loop, fast):  # both hold exactly the k hardest candidates, and n_masked in all
        assert mask.sum(dim=1).tolist() == [n_masked] * 8
        assert torch.equal(mask & hard, hard)
    assert not torch.equal(loop, fast)  # the random rest differs: two random sources


@pytest.mark.parametrize(
    ("ratio", "grad", "expected"),
    [
        (0.6, True, "dense"),
        (0.75, True, "spconv"),
        (0.9, True, "spconv"),
        (0.75, False, "dense"),  # the teacher's pass: spconv gains mostly in the backward
        (0.8, False, "dense"),
        (0.9, False, "spconv"),
    ],
)
def test_auto_backend_runs_the_faster_backend_measured_for_the_pass_and_mask_ratio(ratio, grad, expected):
    pytest.importorskip("spconv")

    # docs/benchmarks.md, encoder backends (forward + backward, and forward only)
    assert SPCONV_FROM_MASKED_FRACTION == {
        "cpu": {"train": 0.75, "inference": 0.9},
        "cuda": {"train": None, "inference": None},
    }
    torch.manual_seed(0)
    auto = AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), backend="auto")
    fixed = AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), backend=expected)
    fixed.load_state_dict(auto.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    mask = random_patch_mask(2, auto.num_patches(x.shape[2:]), ratio, torch.Generator().manual_seed(1))
    visible = mask_to_visible_grid(mask, patch_grid(x.shape[2:], auto.patch_size))
    with torch.set_grad_enabled(grad):
        assert auto.sparse_encoder.resolved_backend(visible) == expected
        assert torch.equal(auto(x, mask), fixed(x, mask))  # the very computation of the chosen backend


def test_auto_backend_without_spconv_stays_dense(monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("no spconv")

    monkeypatch.setattr("anatomask_components.networks.sparse._SpconvBackend", missing)
    encoder = AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), backend="auto").sparse_encoder
    visible = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    visible[0, 0, 0, 0, :2] = True  # 97 % masked: spconv's range on a CPU
    assert encoder.resolved_backend(visible) == "dense"
    with pytest.raises(ValueError, match="'dense', 'spconv' or 'auto'"):
        encoder.backend = "sparse"
