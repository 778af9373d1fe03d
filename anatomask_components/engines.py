"""The AnatoMask / SparK / HPM pretraining iteration for MONAI's Ignite workflows (docs/method.md §6, §12)."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.distributed as dist
from ignite.engine import Engine
from torch.profiler import record_function

from anatomask_components.determinism import sample_seed
from anatomask_components.losses import LossPredictionKind, loss_prediction_loss, masked_mean, patch_scores
from anatomask_components.masking import (
    HardRatioSchedule,
    num_hard,
    num_masked,
    random_patch_mask,
    reconstruction_guided_mask,
)
from anatomask_components.teacher import EMATeacher, unwrap_model

__all__ = ["AnatoMaskIteration", "training_scalars"]

Precision = Literal["fp32", "bf16", "fp16"]
Masking = Literal["anatomask", "random", "hpm"]
_SCALARS = ("loss", "reconstruction_loss", "predictor_loss", "hard_ratio", "num_hard", "ema_momentum", "lr")


class AnatoMaskIteration:
    """One pretraining step (teacher pass -> mask -> student pass) for ``SupervisedTrainer``.

    The mask of every strategy has exactly ``n_masked`` patches per sample; ``k = floor(n_masked * r_t)``
    of them are chosen by the teacher, the rest at random (:func:`reconstruction_guided_mask`):

    - ``"anatomask"``: the teacher reconstructs the input under a random mask; its per-patch errors on
      the patches it had masked rank them.
    - ``"hpm"`` (Hard Patches Mining, SelfMedHPM): the teacher's loss predictor ranks every patch of the
      UNMASKED input. The network needs a loss predictor.
    - ``"random"``: SparK's uniformly random mask.

    Whenever the network has a loss predictor (``loss_predictor`` of the pretraining models), it is
    trained with every strategy: ``loss = reconstruction + predictor_weight * predictor loss``, its targets
    being the detached per-patch reconstruction losses of the masked patches.

    Args:
        masking: ``"anatomask"``, ``"hpm"`` or ``"random"``.
        mask_ratio: fraction of masked patches (0.6 AnatoMask, 0.75 HPM).
        teacher: the EMA teacher handler; required for ``"anatomask"`` and ``"hpm"``.
        schedule: the hard-ratio schedule ``r_t`` (HPM's ``alpha_t``); required for ``"anatomask"`` and
            ``"hpm"``.
        lowest: take the lowest teacher scores ("low significance" ablation).
        teacher_target: ``"raw"`` scores against the raw patch (reference) or ``"normalized"`` against
            the per-patch normalised target the student is trained on.
        grad_clip: max gradient norm (12); 0 disables clipping.
        precision: ``"fp32"`` (reference), ``"bf16"`` autocast, or ``"fp16"`` autocast with a grad scaler.
        seed: base seed of the masks; each iteration's masks depend only on (seed, rank, iteration).
        image_key: key of the image in the batch.
        predictor_loss: loss of the loss predictor, ``"relative"`` (HPM default) or ``"absolute"``
            (:func:`~anatomask_components.losses.loss_prediction_loss`).
        predictor_weight: its weight in the total loss (1).
        teacher_precision: precision of the teacher pass alone, ``None`` (default) = ``precision``; an
            approximation of the fp32 teacher when lower (its agreement with the fp32 teacher's choice
            is measured by ``benchmarks/teacher_precision.py``, docs/benchmarks.md).
        channels_last: run student and teacher in the ``channels_last_3d`` memory format (same values;
            faster convolutions on CPU). The network is converted in place at the first iteration.
        compile: run the student's forward through ``torch.compile`` (off by default: compiling STU-Net-B
            takes minutes and pays off only on long runs).
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms for the fixed crop size
            (CUDA only; the chosen algorithms may differ from run to run).

    Returns (per call): a dict with ``loss`` and the scalars that are logged (``hard_ratio``,
    ``num_hard``, ``ema_momentum``, ``lr``; with a loss predictor also ``reconstruction_loss`` and
    ``predictor_loss``).
    """

    def __init__(
        self,
        masking: Masking = "anatomask",
        mask_ratio: float = 0.6,
        teacher: EMATeacher | None = None,
        schedule: HardRatioSchedule | None = None,
        lowest: bool = False,
        teacher_target: Literal["raw", "normalized"] = "raw",
        grad_clip: float = 12.0,
        precision: Precision = "fp32",
        seed: int = 0,
        image_key: str = "image",
        predictor_loss: LossPredictionKind = "relative",
        predictor_weight: float = 1.0,
        teacher_precision: Precision | None = None,
        channels_last: bool = True,
        compile: bool = False,
        cudnn_benchmark: bool = True,
    ) -> None:
        if masking not in ("anatomask", "random", "hpm"):
            raise ValueError(f"masking must be 'anatomask', 'hpm' or 'random', got {masking!r}.")
        if masking != "random" and (teacher is None or schedule is None):
            raise ValueError(
                f"{masking!r} masking needs a `teacher` (EMATeacher) and a `schedule` (HardRatioSchedule)."
            )
        if predictor_loss not in ("relative", "absolute"):
            raise ValueError(f"predictor_loss must be 'relative' or 'absolute', got {predictor_loss!r}.")
        if teacher_target not in ("raw", "normalized"):
            raise ValueError(f"teacher_target must be 'raw' or 'normalized', got {teacher_target!r}.")
        for name, value in (("precision", precision), ("teacher_precision", teacher_precision or precision)):
            if value not in ("fp32", "bf16", "fp16"):
                raise ValueError(f"{name} must be 'fp32', 'bf16' or 'fp16', got {value!r}.")
        self.masking = masking
        self.mask_ratio = mask_ratio
        self.teacher = teacher
        self.schedule = schedule
        self.lowest = lowest
        self.teacher_target = teacher_target
        self.grad_clip = grad_clip
        self.precision = precision
        self.seed = int(seed)
        self.image_key = image_key
        self.predictor_loss = predictor_loss
        self.predictor_weight = float(predictor_weight)
        self.teacher_precision = teacher_precision or precision
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.scaler: torch.amp.GradScaler | None = None
        self._prepared: set[int] = set()
        self._compiled: dict[int, torch.nn.Module] = {}

    @staticmethod
    def _autocast(device: torch.device, precision: Precision):
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def _prepare(self, network: torch.nn.Module, device: torch.device) -> None:
        """Once per network: memory format of student and teacher, cuDNN autotuning."""
        if id(network) in self._prepared:
            return
        network.to(memory_format=self._memory_format())
        if self.teacher is not None:
            self.teacher.teacher.to(memory_format=self._memory_format())
        if device.type == "cuda" and self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self._prepared.add(id(network))

    def _forward_fn(self, network: torch.nn.Module) -> torch.nn.Module:
        if not self.compile:
            return network
        if id(network) not in self._compiled:
            self._compiled[id(network)] = torch.compile(network)
        return self._compiled[id(network)]

    def hard_ratio(self, engine: Engine) -> float:
        """``r_t`` of the current iteration (0 for random masking)."""
        if self.schedule is None or self.masking == "random":
            return 0.0
        epoch_length = engine.state.epoch_length or 1
        return self.schedule(
            engine.state.epoch - 1, (engine.state.iteration - 1) % epoch_length, epoch_length
        )

    def guided_mask(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        model: torch.nn.Module,
        hard_ratio: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The teacher's mask: ``k`` top-ranked patches, the rest at random.

        Args:
            x: ``(B, C, H, W, D)`` input.
            mask: ``(B, L)`` the iteration's random mask (the teacher's input for ``"anatomask"``).
            model: the unwrapped student (for its patch size).
            hard_ratio: ``r_t``.
            generator: random source of the remaining patches.

        Returns:
            ``(B, L)`` bool, True = masked.
        """
        device = x.device
        # inference mode: no autograd bookkeeping at all for the teacher's pass
        with torch.inference_mode():
            if self.masking == "hpm":
                with self._autocast(device, self.teacher_precision):
                    scores = self.teacher.teacher.predict_patch_losses(x)
                scores, candidates = scores.float(), None
            else:
                with self._autocast(device, self.teacher_precision):
                    reconstruction = self.teacher.teacher(x, mask)
                normalized = self.teacher_target == "normalized"
                scores = patch_scores(
                    reconstruction.float(), x, model.patch_size, normalized_target=normalized
                )
                scores, candidates = scores.masked_fill(~mask, 0.0), mask
            guided = reconstruction_guided_mask(
                scores,
                self.mask_ratio,
                hard_ratio,
                candidates=candidates,
                lowest=self.lowest,
                generator=generator,
            )
        return guided.clone()  # an ordinary tensor again, usable by autograd code

    def __call__(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        student = engine.network
        device = engine.state.device or torch.device("cpu")
        x = batchdata[self.image_key]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device=device, dtype=torch.float32)
        self._prepare(student, device)
        x = x.contiguous(memory_format=self._memory_format())
        model = unwrap_model(student)
        with_predictor = getattr(model, "loss_predictor", None) is not None
        if self.masking == "hpm" and not with_predictor:
            raise ValueError(
                "hpm masking needs a network with a loss predictor (network_def: loss_predictor)."
            )
        length = model.num_patches(x.shape[2:])
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator(device=device).manual_seed(
            sample_seed(self.seed, rank, engine.state.iteration)
        )
        mask = random_patch_mask(x.shape[0], length, self.mask_ratio, generator=generator, device=device)
        r_t = self.hard_ratio(engine)
        k = num_hard(num_masked(length, self.mask_ratio), r_t) if self.masking != "random" else 0
        if k > 0:
            with record_function("anatomask.teacher"):  # phases named for torch.profiler (no cost otherwise)
                mask = self.guided_mask(x, mask, model, r_t, generator)

        student.train()
        engine.optimizer.zero_grad(set_to_none=True)
        forward = self._forward_fn(student)
        with record_function("anatomask.student_forward"), self._autocast(device, self.precision):
            if with_predictor:
                reconstruction, predicted = forward(x, mask, return_loss_prediction=True)
            else:
                reconstruction = forward(x, mask)
        per_patch = patch_scores(reconstruction, x, model.patch_size, normalized_target=True)
        reconstruction_loss = masked_mean(per_patch, mask)
        loss = reconstruction_loss
        extra = {}
        if with_predictor:
            predictor_loss = loss_prediction_loss(predicted, per_patch.detach(), mask, self.predictor_loss)
            loss = reconstruction_loss + self.predictor_weight * predictor_loss
            extra = {
                "reconstruction_loss": reconstruction_loss.detach(),
                "predictor_loss": predictor_loss.detach(),
            }
        if self.precision == "fp16":
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(device.type)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(engine.optimizer)
            self._clip(student)
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            with record_function("anatomask.backward"):
                loss.backward()
            with record_function("anatomask.optimizer"):
                self._clip(student)
                engine.optimizer.step()
        return {
            "loss": loss.detach(),
            **extra,
            "hard_ratio": r_t,
            "num_hard": k,
            "ema_momentum": self.teacher.last_momentum if self.teacher is not None else float("nan"),
            "lr": engine.optimizer.param_groups[0]["lr"],
        }

    def _clip(self, network: torch.nn.Module) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            self.scaler = torch.amp.GradScaler(device_type)
            self.scaler.load_state_dict(state["scaler"])


def training_scalars(output: dict[str, Any]) -> dict[str, float]:
    """The per-iteration scalars logged to the console and TensorBoard."""
    return {k: float(output[k]) for k in _SCALARS if k in output}
