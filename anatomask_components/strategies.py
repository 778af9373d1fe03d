"""Masking strategies: what chooses the student's mask in a pretraining iteration (docs/method.md §6.4).

A strategy is the ``masking`` component of the pretraining bundle (``configs/train.json``), chosen by its
``_target_``; :class:`~anatomask_components.engines.AnatoMaskIteration` draws the iteration's random mask
``m0`` and asks the strategy for the student's mask. Every strategy masks exactly ``n_masked = L - round(L (1
- mask_ratio))`` patches per sample, of which ``k = floor(n_masked r_t)`` are the top-scoring ones by its
:meth:`~MaskingStrategy.scores` and the others uniformly random (:func:`~anatomask_components.masking.
reconstruction_guided_mask`):

- :class:`RandomMasking`: SparK's uniformly random mask, ``m0`` itself (``k = 0``).
- :class:`TeacherReconstructionMasking`: AnatoMask; the EMA teacher's reconstruction error under ``m0``
  ranks the patches ``m0`` masked.
- :class:`LossPredictorMasking`: Hard Patches Mining; the EMA teacher's loss predictor ranks every patch of
  the unmasked input.

A new strategy is a subclass of :class:`MaskingStrategy` that defines :meth:`~MaskingStrategy.scores`, a
test, and a config override of ``masking``.

:func:`masked_patch_errors` is the teacher's score, shared by the training step, the pretraining bundle's
``ReconstructionInference``, the scan difficulty and the demo's analysis.
"""

from __future__ import annotations

from typing import Literal

import torch
from ignite.engine import Engine
from torch.profiler import record_function

from anatomask_components.losses import patch_scores
from anatomask_components.masking import HardRatioSchedule, num_hard, num_masked, reconstruction_guided_mask
from anatomask_components.precision import Precision, autocast, check_precision
from anatomask_components.teacher import EMATeacher

__all__ = [
    "LossPredictorMasking",
    "MaskingStrategy",
    "RandomMasking",
    "TeacherReconstructionMasking",
    "masked_patch_errors",
]

TeacherTarget = Literal["raw", "normalized"]


def masked_patch_errors(
    network: torch.nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    patch_size: tuple[int, int, int],
    target: TeacherTarget = "raw",
    precision: Precision = "fp32",
) -> torch.Tensor:
    """The teacher's score: reconstruction error of each patch that ``network`` had to reconstruct.

    Args:
        network: a pretraining model called as ``network(x, mask)``.
        x: ``(B, C, H, W, D)`` input.
        mask: ``(B, L)`` bool, True = masked: the patches ``network`` reconstructs, the only candidates.
        patch_size: the mask unit.
        target: ``"raw"`` (reference) or ``"normalized"`` per-patch target
            (:func:`~anatomask_components.losses.patch_scores`).
        precision: precision of the network's pass (``"bf16"`` and ``"fp16"``: autocast); the errors are
            computed in float32.

    Returns:
        ``(B, L)`` float32 mean squared error per masked patch; 0 on visible patches.
    """
    with autocast(x.device, precision):
        reconstruction = network(x, mask)
    errors = patch_scores(reconstruction.float(), x, patch_size, normalized_target=target == "normalized")
    return errors.masked_fill(~mask, 0.0)


class MaskingStrategy:
    """Base of the masking strategies: ``k = floor(n_masked r_t)`` patches by score, the rest at random.

    Subclasses define :meth:`scores`; without a ``schedule`` ``r_t`` is 0 and the student gets the
    iteration's random mask.

    Args:
        mask_ratio: fraction of masked patches.
        schedule: the hard-ratio schedule ``r_t``; None: ``r_t = 0``.
        lowest: mask the lowest scores instead of the highest.

    Attributes:
        teacher: the EMA teacher handler the strategy scores with (None if it needs none).
    """

    teacher: EMATeacher | None = None

    def __init__(
        self, mask_ratio: float, schedule: HardRatioSchedule | None = None, lowest: bool = False
    ) -> None:
        self.mask_ratio = mask_ratio
        self.schedule = schedule
        self.lowest = lowest

    def hard_ratio(self, engine: Engine) -> float:
        """``r_t`` of the engine's current iteration (0 without a schedule)."""
        if self.schedule is None:
            return 0.0
        epoch_length = engine.state.epoch_length or 1
        return self.schedule(
            engine.state.epoch - 1, (engine.state.iteration - 1) % epoch_length, epoch_length
        )

    def num_hard(self, num_patches: int, hard_ratio: float) -> int:
        """``k = floor(n_masked r_t)``: how many of the ``num_patches`` patches are chosen by score."""
        return num_hard(num_masked(num_patches, self.mask_ratio), hard_ratio)

    def scores(
        self, x: torch.Tensor, model: torch.nn.Module, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-patch scores, higher = harder, and the patches that may be chosen.

        Runs in inference mode, only when ``k > 0``.

        Args:
            x: ``(B, C, H, W, D)`` input.
            model: the unwrapped student (its ``patch_size``, ``num_patches``).
            mask: ``(B, L)`` bool, the iteration's random mask ``m0``.

        Returns:
            ``(B, L)`` scores; ``(B, L)`` bool candidates, or None when any patch may be chosen.
        """
        raise NotImplementedError(f"{type(self).__name__} has a hard-ratio schedule but no scores().")

    def __call__(
        self,
        x: torch.Tensor,
        model: torch.nn.Module,
        mask: torch.Tensor,
        hard_ratio: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The student's mask.

        Args:
            x: ``(B, C, H, W, D)`` input.
            model: the unwrapped student.
            mask: ``(B, L)`` bool, the iteration's random mask ``m0``.
            hard_ratio: ``r_t``.
            generator: random source of the patches not chosen by score.

        Returns:
            ``(B, L)`` bool, True = masked: ``mask`` itself when ``k = 0`` (``generator`` untouched), else
            the ``k`` top-scoring candidates and ``n_masked - k`` random patches.
        """
        if self.num_hard(mask.shape[1], hard_ratio) == 0:
            return mask
        # the phase is named for torch.profiler (no cost otherwise); inference mode: no autograd bookkeeping
        with record_function("anatomask.teacher"):
            with torch.inference_mode():
                scores, candidates = self.scores(x, model, mask)
                guided = reconstruction_guided_mask(
                    scores,
                    self.mask_ratio,
                    hard_ratio,
                    candidates=candidates,
                    lowest=self.lowest,
                    generator=generator,
                )
            return guided.clone()  # an ordinary tensor again, usable by autograd code


class RandomMasking(MaskingStrategy):
    """SparK's uniformly random mask: the iteration's random mask as it is.

    Args:
        mask_ratio: fraction of masked patches (0.6, SparK's and AnatoMask's).
    """

    def __init__(self, mask_ratio: float = 0.6) -> None:
        super().__init__(mask_ratio)

    def num_hard(self, num_patches: int, hard_ratio: float) -> int:
        """0 whatever ``r_t``: nothing is chosen by score."""
        return 0


def _check_teacher(strategy: str, teacher: EMATeacher | None, schedule: HardRatioSchedule | None) -> None:
    if teacher is None or schedule is None:
        raise ValueError(f"{strategy} needs a `teacher` (EMATeacher) and a `schedule` (HardRatioSchedule).")


class TeacherReconstructionMasking(MaskingStrategy):
    """AnatoMask's self-masking (docs/method.md §6.2, §6.3): the EMA teacher reconstructs the input under the
    iteration's random mask ``m0``; the patches with the largest errors (:func:`masked_patch_errors`) among
    those ``m0`` masked are masked for the student.

    Args:
        teacher: the EMA teacher handler; its network scores.
        schedule: the hard-ratio schedule ``r_t``.
        mask_ratio: fraction of masked patches (0.6).
        target: ``"raw"`` scores against the raw patch (reference) or ``"normalized"`` against the per-patch
            normalised target the student is trained on.
        lowest: mask the lowest scores ("low significance" ablation).
        precision: precision of the teacher's pass: ``"fp32"`` (reference), or ``"bf16"`` / ``"fp16"``
            autocast, an approximation of the fp32 teacher's choice (measured by
            ``benchmarks/teacher_precision.py``, docs/benchmarks.md).

    Raises:
        ValueError: no teacher or schedule, an unknown ``target`` or ``precision``.
    """

    def __init__(
        self,
        teacher: EMATeacher,
        schedule: HardRatioSchedule,
        mask_ratio: float = 0.6,
        target: TeacherTarget = "raw",
        lowest: bool = False,
        precision: Precision = "fp32",
    ) -> None:
        _check_teacher(type(self).__name__, teacher, schedule)
        if target not in ("raw", "normalized"):
            raise ValueError(f"target must be 'raw' or 'normalized', got {target!r}.")
        check_precision("the teacher's precision", precision)
        super().__init__(mask_ratio, schedule, lowest)
        self.teacher = teacher
        self.target = target
        self.precision = precision

    def scores(
        self, x: torch.Tensor, model: torch.nn.Module, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's errors on the patches ``mask`` hid (the candidates)."""
        errors = masked_patch_errors(
            self.teacher.teacher, x, mask, model.patch_size, self.target, self.precision
        )
        return errors, mask


class LossPredictorMasking(MaskingStrategy):
    """Hard Patches Mining (SelfMedHPM's mask generator, docs/method.md §12.3): the EMA teacher's loss
    predictor scores every patch of the **unmasked** input; the highest predicted losses are masked.

    The student needs a loss predictor (``network_def: loss_predictor``), which the iteration trains.

    Args:
        teacher: the EMA teacher handler; its ``predict_patch_losses`` scores.
        schedule: the hard-ratio schedule ``alpha_t``.
        mask_ratio: fraction of masked patches (0.75, HPM's).
        lowest: mask the lowest predicted losses.
        precision: precision of the teacher's pass (see :class:`TeacherReconstructionMasking`).

    Raises:
        ValueError: no teacher or schedule, an unknown ``precision``; when called, a student without a loss
            predictor.
    """

    def __init__(
        self,
        teacher: EMATeacher,
        schedule: HardRatioSchedule,
        mask_ratio: float = 0.75,
        lowest: bool = False,
        precision: Precision = "fp32",
    ) -> None:
        _check_teacher(type(self).__name__, teacher, schedule)
        check_precision("the teacher's precision", precision)
        super().__init__(mask_ratio, schedule, lowest)
        self.teacher = teacher
        self.precision = precision

    def __call__(
        self,
        x: torch.Tensor,
        model: torch.nn.Module,
        mask: torch.Tensor,
        hard_ratio: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        if getattr(model, "loss_predictor", None) is None:
            raise ValueError(
                "hpm masking (LossPredictorMasking) needs a network with a loss predictor "
                "(network_def: loss_predictor)."
            )
        return super().__call__(x, model, mask, hard_ratio, generator)

    def scores(
        self, x: torch.Tensor, model: torch.nn.Module, mask: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """The teacher's predicted losses of every patch of the unmasked input (no candidate restriction)."""
        with autocast(x.device, self.precision):
            predicted = self.teacher.teacher.predict_patch_losses(x)
        return predicted.float(), None
