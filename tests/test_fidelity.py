"""AnatoMask against the reference code: the guided mask of a real iteration, and the reference defaults."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from pretrain_common import TINY_STUNET, guided_iteration, iteration_engine

from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.losses import patch_scores
from anatomask_components.masking import HardRatioSchedule, num_hard, num_masked, random_patch_mask
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.strategies import TeacherReconstructionMasking
from anatomask_components.teacher import EMATeacher

PRETRAIN_TRAIN = (
    Path(__file__).resolve().parents[1] / "bundles" / "anatomask_pretrain" / "configs" / "train.json"
)


def tiny_model(seed: int = 0, **options) -> AnatoMaskPretrainModel:
    torch.manual_seed(seed)
    return AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), **options)


def _holds_teacher_choice(
    mask: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor, k: int, lowest: bool
) -> bool:
    """Whether every row of ``mask`` holds the ``k`` top (or bottom) scoring candidates."""
    ranked = (-scores if lowest else scores).masked_fill(~candidates, float("-inf"))
    return bool(mask.gather(1, ranked.topk(k, dim=1).indices).all())


@pytest.mark.parametrize(("lowest", "teacher_target"), [(False, "raw"), (True, "raw"), (False, "normalized")])
def test_the_student_mask_holds_the_teachers_top_k_masked_patches(lowest, teacher_target):
    student = tiny_model()
    teacher = EMATeacher(student)
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in teacher.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen: list[dict[str, torch.Tensor]] = []
    teacher.teacher.register_forward_hook(
        lambda m, args, out: seen.append({"teacher_mask": args[1].clone(), "reconstruction": out.detach()})
    )
    student.register_forward_pre_hook(lambda m, args: seen[-1].__setitem__("student_mask", args[1].clone()))
    step = guided_iteration(teacher, {"lowest": lowest, "target": teacher_target})
    engine = iteration_engine(student)
    length = student.num_patches((32, 32, 32))
    n_masked = num_masked(length, 0.6)
    k = num_hard(n_masked, 0.5)
    assert (length, n_masked, k) == (64, 38, 19)
    gen = torch.Generator().manual_seed(7)
    for iteration in (1, 2):
        engine.state.iteration = iteration
        x = torch.randn(2, 1, 32, 32, 32, generator=gen)
        output = step(engine, {"image": x})
        teacher.update(0.9)
        record = seen[-1]
        assert output["num_hard"] == k
        teacher_mask, student_mask = record["teacher_mask"], record["student_mask"]
        assert teacher_mask.sum(dim=1).tolist() == [n_masked] * 2  # the teacher saw a random mask m0
        assert student_mask.sum(dim=1).tolist() == [n_masked] * 2
        scores = patch_scores(
            record["reconstruction"], x, student.patch_size, normalized_target=teacher_target == "normalized"
        )
        assert _holds_teacher_choice(student_mask, scores, teacher_mask, k, lowest)
        # a mask drawn without the teacher's scores would fail the same check
        ignoring = random_patch_mask(2, length, 0.6, generator=gen)
        assert not _holds_teacher_choice(ignoring, scores, teacher_mask, k, lowest)
    assert len(seen) == 2


def test_without_hard_patches_the_teacher_is_not_asked():
    student = tiny_model()
    teacher = EMATeacher(student)
    calls = []
    teacher.teacher.register_forward_hook(lambda m, args, out: calls.append(1))
    step = AnatoMaskIteration(TeacherReconstructionMasking(teacher, HardRatioSchedule(total_epochs=10), 0.6))
    output = step(iteration_engine(student), {"image": torch.randn(1, 1, 32, 32, 32)})
    assert output["num_hard"] == 0 and output["hard_ratio"] == 0.0 and calls == []


# ---------------------------------------------------------------------------------------------
# reference defaults (bundles/anatomask_pretrain/docs/README.md, "Differences from the reference")


def _encoder_convs(model: AnatoMaskPretrainModel) -> list[nn.Conv3d]:
    return [m for m in model.sparse_encoder.sp_cnn.modules() if isinstance(m, nn.Conv3d)]


def test_encoder_initialisation_is_pytorchs_default_unless_he_is_asked_for():
    reference = tiny_model()
    for conv in _encoder_convs(reference):
        bound = 1.0 / math.sqrt(conv.weight[0].numel())  # kaiming_uniform(a=sqrt(5)) and the bias bound
        assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
        assert conv.bias.abs().sum() > 0
    he = tiny_model(encoder_init="he")
    torch.manual_seed(0)
    stunet = STUNet(1, 1, **TINY_STUNET)  # nnU-Net's He initialisation, zero biases
    official = [m for m in stunet.conv_blocks_context.modules() if isinstance(m, nn.Conv3d)]
    for ours, theirs in zip(_encoder_convs(he), official):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
        assert not ours.bias.any()
    with pytest.raises(ValueError):
        tiny_model(encoder_init="xavier")


def test_densify_projection_initialisation_and_norm_epsilon():
    reference = tiny_model()
    projections = [p for p in reference.densify_projs if isinstance(p, nn.Conv3d)]
    assert len(projections) == 2  # mask unit 8: three levels, the deepest (64 = 64 channels) an identity
    assert all(p.bias.abs().sum() > 0 for p in projections)  # PyTorch's default: uniform biases
    assert all(norm.eps == 1e-6 for norm in reference.densify_norms)
    spark = tiny_model(densify_init="trunc_normal", densify_norm_eps=1e-5)
    for p in (p for p in spark.densify_projs if isinstance(p, nn.Conv3d)):
        assert not p.bias.any() and p.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(norm.eps == 1e-5 for norm in spark.densify_norms)


def test_the_pretraining_bundle_defaults_follow_the_reference():
    config = json.loads(PRETRAIN_TRAIN.read_text())
    assert config["decay_all"] is True
    assert config["encoder_init"] == "pytorch" and config["densify_init"] == "pytorch"
    assert config["densify_norm_eps"] == 1e-6
    assert config["loss_predictor"] is None
    # AnatoMask's teacher chooses, scoring against the raw patch (the reference's target)
    masking = config["masking"]
    assert masking["_target_"] == "anatomask_components.strategies.TeacherReconstructionMasking"
    assert masking["target"] == "@teacher_target" and config["teacher_target"] == "raw"
    assert masking["lowest"] == "@lowest_scores" and config["lowest_scores"] is False
    network = config["network_def"]
    for key in ("encoder_init", "densify_init", "densify_norm_eps", "loss_predictor"):
        assert network[key] == f"@{key}"
