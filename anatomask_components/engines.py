"""The pretraining iteration (AnatoMask, SparK, HPM or any masking strategy) for MONAI's Ignite workflows
(docs/method.md §6, §12)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine
from torch.profiler import record_function

from anatomask_components.determinism import sample_seed
from anatomask_components.losses import LossPredictionKind, loss_prediction_loss, masked_mean, patch_scores
from anatomask_components.masking import random_patch_mask
from anatomask_components.precision import Precision, autocast, check_precision
from anatomask_components.strategies import MaskingStrategy
from anatomask_components.teacher import EMATeacher, unwrap_model

__all__ = ["AnatoMaskIteration", "training_scalars"]

_SCALARS = ("loss", "reconstruction_loss", "predictor_loss", "hard_ratio", "num_hard", "ema_momentum", "lr")


class AnatoMaskIteration:
    """One pretraining step (random mask -> the strategy's mask -> student pass) for ``SupervisedTrainer``.

    The iteration draws a uniformly random mask ``m0`` of ``masking.mask_ratio``; the masking strategy
    (:mod:`anatomask_components.strategies`: AnatoMask's teacher, HPM's loss predictor, SparK's random mask,
    or any other) turns it into the student's mask. The iteration itself holds the step's mechanics:
    precision, gradient clipping, the loss predictor's loss, memory format, compilation.

    Whenever the network has a loss predictor (``loss_predictor`` of the pretraining models), it is
    trained with every strategy: ``loss = reconstruction + predictor_weight * predictor loss``, its targets
    being the detached per-patch reconstruction losses of the masked patches.

    Args:
        masking: the masking strategy (:class:`~anatomask_components.strategies.MaskingStrategy`).
        teacher: the EMA teacher handler trained alongside, whose momentum is reported and whose network
            takes the memory format; None: the strategy's (``masking.teacher``), if any.
        grad_clip: max gradient norm (12); 0 disables clipping.
        precision: ``"fp32"`` (reference), ``"bf16"`` autocast, or ``"fp16"`` autocast with a grad scaler.
        seed: base seed of the masks; each iteration's masks depend only on (seed, rank, iteration).
        image_key: key of the image in the batch.
        predictor_loss: loss of the loss predictor, ``"relative"`` (HPM default) or ``"absolute"``
            (:func:`~anatomask_components.losses.loss_prediction_loss`).
        predictor_weight: its weight in the total loss (1).
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
        masking: MaskingStrategy,
        teacher: EMATeacher | None = None,
        grad_clip: float = 12.0,
        precision: Precision = "fp32",
        seed: int = 0,
        image_key: str = "image",
        predictor_loss: LossPredictionKind = "relative",
        predictor_weight: float = 1.0,
        channels_last: bool = True,
        compile: bool = False,
        cudnn_benchmark: bool = True,
    ) -> None:
        if predictor_loss not in ("relative", "absolute"):
            raise ValueError(f"predictor_loss must be 'relative' or 'absolute', got {predictor_loss!r}.")
        check_precision("precision", precision)
        self.masking = masking
        self.teacher = teacher if teacher is not None else masking.teacher
        self.grad_clip = grad_clip
        self.precision = precision
        self.seed = int(seed)
        self.image_key = image_key
        self.predictor_loss = predictor_loss
        self.predictor_weight = float(predictor_weight)
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.scaler: torch.amp.GradScaler | None = None
        self._prepared: set[int] = set()
        self._compiled: dict[int, torch.nn.Module] = {}

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

    def __call__(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        student = engine.network
        device = engine.state.device or torch.device("cpu")
        x = batchdata[self.image_key]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device=device, dtype=torch.float32)
        self._prepare(student, device)
        x = x.contiguous(memory_format=self._memory_format())
        model = unwrap_model(student)
        with_predictor = getattr(model, "loss_predictor", None) is not None
        length = model.num_patches(x.shape[2:])
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator(device=device).manual_seed(
            sample_seed(self.seed, rank, engine.state.iteration)
        )
        mask = random_patch_mask(
            x.shape[0], length, self.masking.mask_ratio, generator=generator, device=device
        )
        r_t = self.masking.hard_ratio(engine)
        k = self.masking.num_hard(length, r_t)
        mask = self.masking(x, model, mask, r_t, generator)

        student.train()
        engine.optimizer.zero_grad(set_to_none=True)
        forward = self._forward_fn(student)
        with record_function("anatomask.student_forward"), autocast(device, self.precision):
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
