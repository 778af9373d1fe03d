"""Masking strategies (anatomask_components.strategies, docs/method.md §6.4): what each gives the student, the
same masks as the iteration's former built-in modes, and a new strategy added through the bundle's config."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from pretrain_common import TINY_STUNET, iteration_engine

from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.determinism import sample_seed
from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.losses import patch_scores
from anatomask_components.masking import (
    HardRatioSchedule,
    num_hard,
    num_masked,
    random_patch_mask,
    reconstruction_guided_mask,
)
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.patches import patchify
from anatomask_components.strategies import (
    LossPredictorMasking,
    MaskingStrategy,
    RandomMasking,
    TeacherReconstructionMasking,
    masked_patch_errors,
)
from anatomask_components.teacher import EMATeacher

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "anatomask_pretrain" / "configs"


class BrightestPatchesMasking(MaskingStrategy):
    """The strategy this module adds: the patches with the highest mean intensity are the hard ones.

    Args:
        mask_ratio: fraction of masked patches.
        schedule: the hard-ratio schedule ``r_t``.
    """

    def __init__(self, mask_ratio: float, schedule: HardRatioSchedule) -> None:
        super().__init__(mask_ratio, schedule)

    def scores(
        self, x: torch.Tensor, model: torch.nn.Module, mask: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        return patchify(x, model.patch_size).mean(dim=-1), None


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(seed: int = 0, **options) -> AnatoMaskPretrainModel:
    torch.manual_seed(seed)
    return AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), **options)


def shifted_teacher(student: torch.nn.Module) -> EMATeacher:
    """A teacher that differs from the student, as after some EMA steps."""
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in teacher.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen(5)))
    return teacher


def strategy(kind: str, teacher: EMATeacher, hard_ratio: float, ratio: float = 0.6) -> MaskingStrategy:
    schedule = HardRatioSchedule(total_epochs=1, start=hard_ratio, end=hard_ratio)
    if kind == "random":
        return RandomMasking(ratio)
    if kind == "teacher":
        return TeacherReconstructionMasking(teacher, schedule, ratio)
    if kind == "teacher_normalized_lowest":
        return TeacherReconstructionMasking(teacher, schedule, ratio, target="normalized", lowest=True)
    if kind == "loss_predictor":
        return LossPredictorMasking(teacher, schedule, ratio)
    return BrightestPatchesMasking(ratio, schedule)


@torch.inference_mode()
def expected_hardest(
    kind: str, x: torch.Tensor, teacher: EMATeacher, m0: torch.Tensor, k: int
) -> torch.Tensor:
    """``(B, L)`` bool: the ``k`` patches a strategy must choose, ranked here by sorting its scores."""
    network = teacher.teacher
    if kind == "loss_predictor":
        ranked = network.predict_patch_losses(x)
    elif kind == "brightest":
        ranked = patchify(x, network.patch_size).mean(dim=-1)
    else:
        normalized = kind == "teacher_normalized_lowest"
        errors = patch_scores(network(x, m0), x, network.patch_size, normalized_target=normalized)
        ranked = (-errors if normalized else errors).masked_fill(~m0, -math.inf)  # lowest when normalized
    order = ranked.argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(m0).scatter_(1, order, True)


@pytest.mark.parametrize(
    "kind", ["random", "teacher", "teacher_normalized_lowest", "loss_predictor", "brightest"]
)
def test_every_strategy_masks_n_masked_patches_of_which_k_are_its_hardest(kind):
    student = tiny_model(loss_predictor="head" if kind == "loss_predictor" else None)
    teacher = shifted_teacher(student)
    engine = iteration_engine(student)
    x = torch.randn(3, 1, 32, 32, 32, generator=gen(0))
    length = student.num_patches(x.shape[2:])
    n_masked = num_masked(length, 0.6)
    assert (length, n_masked) == (64, 38)
    for hard_ratio, k in ((0.0, 0), (0.25, 9), (0.5, 19), (1.0, 38)):
        masking = strategy(kind, teacher, hard_ratio)
        r_t = masking.hard_ratio(engine)
        assert r_t == (0.0 if kind == "random" else hard_ratio)  # SparK never asks for hard patches
        k = 0 if kind == "random" else k
        assert masking.num_hard(length, r_t) == k == math.floor(n_masked * r_t)
        m0 = random_patch_mask(3, length, 0.6, generator=gen(1))
        mask = masking(x, student, m0, r_t, gen(2))
        assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == [n_masked] * 3
        if k == 0:
            assert torch.equal(mask, m0)  # the iteration's random mask as it is
            if kind == "random":  # whatever r_t it is given
                assert masking.num_hard(length, 0.5) == 0 and masking(x, student, m0, 0.5, gen(2)) is m0
            continue
        hardest = expected_hardest(kind, x, teacher, m0, k)
        assert torch.equal(mask & hardest, hardest), hard_ratio
        if kind.startswith("teacher") and k == n_masked:
            assert torch.equal(mask, m0)  # every patch the teacher reconstructed is hard
        if not kind.startswith("teacher"):  # any patch may be hard: the random mask alone does not hold them
            assert not torch.equal(m0 & hardest, hardest)


def former_engine_mask(
    kind: str,
    x: torch.Tensor,
    teacher: torch.nn.Module,
    iteration: int,
    hard_ratio: float,
    options: dict,
) -> torch.Tensor:
    """The student's mask as ``AnatoMaskIteration`` computed it with its former string switch ``masking``
    (``"anatomask"``, ``"hpm"`` or ``"random"``; commit 1657923, seed 0, rank 0), written from its source."""
    generator = torch.Generator().manual_seed(sample_seed(0, 0, iteration))
    length = teacher.num_patches(x.shape[2:])
    mask = random_patch_mask(x.shape[0], length, 0.6, generator=generator)
    k = num_hard(num_masked(length, 0.6), hard_ratio) if kind != "random" else 0
    if k == 0:
        return mask
    bf16 = options.get("precision") == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode():
        if kind == "hpm":
            with autocast:
                scores = teacher.predict_patch_losses(x)
            scores, candidates = scores.float(), None
        else:
            with autocast:
                reconstruction = teacher(x, mask)
            normalized = options.get("target", "raw") == "normalized"
            scores = patch_scores(reconstruction.float(), x, teacher.patch_size, normalized_target=normalized)
            scores, candidates = scores.masked_fill(~mask, 0.0), mask
        guided = reconstruction_guided_mask(
            scores,
            0.6,
            hard_ratio,
            candidates=candidates,
            lowest=options.get("lowest", False),
            generator=generator,
        )
    return guided.clone()


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("anatomask", {}),
        ("anatomask", {"target": "normalized", "lowest": True}),
        ("anatomask", {"precision": "bf16"}),
        ("hpm", {}),
        ("random", {}),
    ],
)
def test_the_strategies_give_the_masks_of_the_former_masking_modes(kind, options):
    student = tiny_model(loss_predictor="head" if kind == "hpm" else None)
    teacher = shifted_teacher(student)
    schedule = HardRatioSchedule(total_epochs=1, start=0.5, end=0.5)
    if kind == "anatomask":
        masking = TeacherReconstructionMasking(teacher, schedule, 0.6, **options)
    elif kind == "hpm":
        masking = LossPredictorMasking(teacher, schedule, 0.6)
    else:
        masking = RandomMasking(0.6)
    step = AnatoMaskIteration(masking, teacher=teacher)
    engine = iteration_engine(student)
    seen = []
    student.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].detach().clone(), args[1].clone()))
    )
    data = gen(3)
    for iteration in (1, 2, 3):
        engine.state.iteration = iteration
        output = step(engine, {"image": torch.randn(2, 1, 32, 32, 32, generator=data)})
        x, student_mask = seen[-1]
        # the teacher before its EMA step, as the iteration saw it
        expected = former_engine_mask(kind, x, teacher.teacher, iteration, 0.5, options)
        assert torch.equal(student_mask, expected), iteration
        assert output["num_hard"] == (0 if kind == "random" else 19)
        teacher.update(0.9)


def test_the_teachers_score_is_the_error_of_the_masked_patches_in_float32():
    network = tiny_model()
    network.eval()
    x = torch.randn(2, 1, 32, 32, 32, generator=gen(0))
    mask = random_patch_mask(2, 64, 0.6, generator=gen(1))
    with torch.no_grad():
        reconstruction = network(x, mask)
        for target in ("raw", "normalized"):
            errors = masked_patch_errors(network, x, mask, network.patch_size, target)
            expected = patch_scores(
                reconstruction, x, network.patch_size, normalized_target=target == "normalized"
            )
            assert torch.equal(errors, expected * mask)
            assert (errors[mask] > 0).all() and not errors[~mask].any()
        dtypes = []
        network.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
        errors = masked_patch_errors(network, x, mask, network.patch_size, precision="bf16")
    assert dtypes == [torch.bfloat16] and errors.dtype == torch.float32


def test_strategy_arguments_are_checked():
    teacher = EMATeacher(tiny_model())
    schedule = HardRatioSchedule(total_epochs=1)
    with pytest.raises(ValueError, match="teacher"):
        TeacherReconstructionMasking(None, schedule)
    with pytest.raises(ValueError, match="schedule"):
        LossPredictorMasking(teacher, None)
    with pytest.raises(ValueError, match="'raw' or 'normalized'"):
        TeacherReconstructionMasking(teacher, schedule, target="scaled")

    class Unscored(MaskingStrategy):
        pass

    m0 = random_patch_mask(1, 64, 0.6, generator=gen(0))
    with pytest.raises(NotImplementedError, match="Unscored"):
        Unscored(0.6, HardRatioSchedule(1, 0.5, 0.5))(
            torch.zeros(1, 1, 32, 32, 32), tiny_model(), m0, 0.5, gen(0)
        )


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("strategy_scans")
    write_phantom_dataset(root, n_cases=2, shape=(40, 40, 44), layout="folder", seed=3)
    return root


@pytest.mark.slow
def test_a_new_strategy_is_one_class_and_one_config_override(scans, tmp_path):
    override = {
        "masking": {
            "_target_": f"{__name__}.BrightestPatchesMasking",
            "mask_ratio": "@mask_ratio",
            "schedule": "@hard_ratio_schedule",
        }
    }
    (tmp_path / "brightest.json").write_text(json.dumps(override))
    workflow = ConfigWorkflow(
        config_file=[
            str(CONFIGS / "train.json"),
            str(CONFIGS / "small_override.json"),
            str(tmp_path / "brightest.json"),
        ],
        workflow_type="train",
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(tmp_path / "bundle"),
        dataset_dir=str(scans),
        batch_size=1,
        max_epochs=1,
        hard_ratio_start=0.5,
        hard_ratio_end=0.5,
    )
    workflow.initialize()
    parser = workflow.parser
    masking = parser.get_parsed_content("masking")
    assert type(masking) is BrightestPatchesMasking
    assert parser.get_parsed_content("train#iteration").masking is masking
    network = parser.get_parsed_content("network")
    seen, outputs = [], []
    network.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].detach().clone(), args[1].clone()))
    )
    trainer = parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    workflow.run()

    length = network.num_patches(parser["roi_size"])
    k = num_hard(num_masked(length, 0.6), 0.5)
    assert len(seen) == 2 and [o["num_hard"] for o in outputs] == [k, k] and k == 29
    # the EMA teacher is trained and reported beside any strategy
    assert all(math.isfinite(float(o["ema_momentum"])) for o in outputs)
    for iteration, (x, student_mask) in enumerate(seen, start=1):
        generator = torch.Generator().manual_seed(sample_seed(parser["seed"], 0, iteration))
        m0 = random_patch_mask(1, length, 0.6, generator=generator)
        assert torch.equal(student_mask, masking(x, network, m0, 0.5, generator))  # what the class returns
        brightest = patchify(x, network.patch_size).mean(dim=-1).topk(k, dim=1).indices
        assert student_mask.gather(1, brightest).all()
