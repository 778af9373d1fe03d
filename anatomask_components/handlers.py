"""Ignite handlers of the bundles.

- :class:`TrainingProgress`: progress lines with the time left, and a JSON-lines log of every iteration's
  scalars (all bundles).
- :class:`PretrainedWeightsLoader`: initialise the network from pretrained weights at the start of training
  and log what was loaded (MONAI's ``CheckpointLoader(strict_shape=False)`` silently loads nothing).
- :class:`BestModelSaver`: write ``models/model.pt`` (flat state dict, atomically) when validation improves.
- :class:`SegmentationMetricsSaver`: DSC and NSD per case and class in the original image space, written as
  CSV and a JSON summary when an evaluation ends.

The inference evaluators' process functions are in :mod:`anatomask_components.inference`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from anatomask_components.checkpointing import atomic_save, is_main_process
from anatomask_components.data.validation import source_name
from anatomask_components.data.writers import align_to_reference, write_label_map
from anatomask_components.evaluation import (
    DEFAULT_TOLERANCE_MM,
    case_metrics,
    format_report,
    voxel_spacing,
    write_metrics,
)
from anatomask_components.files import atomic_write_text
from anatomask_components.teacher import unwrap_model
from anatomask_components.weights import WeightTransferReport, transfer_weights

__all__ = [
    "BestModelSaver",
    "PretrainedWeightsLoader",
    "SegmentationMetricsSaver",
    "TrainingProgress",
    "read_training_log",
]

logger = logging.getLogger(__name__)


class PretrainedWeightsLoader:
    """Load pretrained weights into the network when training starts, and log the transfer report.

    Attach it before any handler that resumes training from a checkpoint: both act at ``STARTED``, in the
    order they were attached, so a resumed checkpoint wins over the pretrained initialisation.

    Args:
        load_path: a checkpoint in any format :func:`~anatomask_components.weights.transfer_weights` reads
            (pretraining export, reference AnatoMask or official STU-Net checkpoint); empty or None means
            training from scratch, which is logged.
        network: the network to initialise (DDP wrappers are unwrapped).
        network_key: ``"student"`` or ``"teacher"`` for training checkpoints of the pretraining bundle.
        adapt_channels: adapt the input convolutions to the network's input channels.
        require_all: fail unless every network tensor is loaded.
        strict_shapes: fail instead of warning when the file holds a network tensor under another shape
            (a checkpoint of another network); the bundles' ``strict_pretrained`` key.
        report_path: also write the report as JSON here (counts and tensor names; ``{"source": null}`` when
            training from scratch), e.g. ``runs/weight_transfer.json``.
    """

    def __init__(
        self,
        load_path: str | os.PathLike | None,
        network: nn.Module,
        network_key: str = "student",
        adapt_channels: bool = True,
        require_all: bool = False,
        strict_shapes: bool = False,
        report_path: str | os.PathLike | None = None,
    ) -> None:
        self.load_path = load_path
        self.network = network
        self.network_key = network_key
        self.adapt_channels = adapt_channels
        self.require_all = require_all
        self.strict_shapes = strict_shapes
        self.report_path = Path(report_path) if report_path else None
        self.report: WeightTransferReport | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> WeightTransferReport | None:
        if not self.load_path:
            logger.info("no pretrained weights given (pretrained_weights is empty): training from scratch")
            self._write_report(
                {"source": None, "num_network_tensors": len(unwrap_model(self.network).state_dict())}
            )
            return None
        self.report = transfer_weights(
            self.network,
            self.load_path,
            network_key=self.network_key,
            adapt_channels=self.adapt_channels,
            require_all=self.require_all,
            strict_shapes=self.strict_shapes,
        )
        logger.info(self.report.summary())
        self._write_report(
            {
                **asdict(self.report),
                "num_transferred": self.report.num_transferred,
                "num_initial": self.report.num_initial,
                "summary": self.report.summary(),
            }
        )
        return self.report

    def _write_report(self, report: dict[str, Any]) -> None:
        if self.report_path is not None and is_main_process():
            atomic_write_text(self.report_path, json.dumps(report, indent=4) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory (MiB)."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class TrainingProgress:
    """Progress of a training run: a line every few iterations with the time left, and a JSON-lines log.

    Each printed line reads ``train: epoch 3/80, iteration 7/240, loss 0.8123, 0.95 s/it, elapsed 0:07,
    left 3:46``; the time left is extrapolated from the iterations run so far in this process (a resumed
    run does not count the iterations it skipped). Every iteration appends one JSON object to ``log_path``:
    ``{"iteration", "epoch", "seconds" (that iteration's wall time), "elapsed", <scalars>, "peak_rss_mb",
    "peak_gpu_mb" (CUDA only)}``. A run that starts from iteration 0 truncates the log; a resumed one
    appends (:func:`read_training_log` keeps the last entry of each iteration). Main process only.

    Args:
        log_path: the JSON-lines file, or None to print only.
        print_every: print every N iterations (and the first and last).
        output_transform: engine output -> ``{name: float}`` (default: ``{"loss": output["loss"]}``).
        tag: prefix of the printed lines.
    """

    def __init__(
        self,
        log_path: str | os.PathLike | None = None,
        print_every: int = 10,
        output_transform: Callable[[Any], Mapping[str, float]] | None = None,
        tag: str = "train",
    ) -> None:
        self.log_path = Path(log_path) if log_path else None
        self.print_every = max(1, int(print_every))
        self.output_transform = output_transform or (lambda output: {"loss": output["loss"]})
        self.tag = tag
        self._start_time: float | None = None
        self._start_iteration = 0
        self._last_time = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._mark_start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _mark_start(self, engine: Engine) -> None:
        if self._start_time is not None:
            return
        self._start_time = self._last_time = time.perf_counter()
        self._start_iteration = engine.state.iteration - 1
        if self.log_path is not None and is_main_process():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self._start_iteration == 0:
                self.log_path.write_text("")

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        now = time.perf_counter()
        seconds, self._last_time = now - self._last_time, now
        elapsed = now - (self._start_time or now)
        state = engine.state
        total = (state.epoch_length or 1) * (state.max_epochs or 1)
        done = state.iteration - self._start_iteration
        scalars = {k: float(v) for k, v in self.output_transform(state.output).items()}
        entry = {
            "iteration": state.iteration,
            "epoch": state.epoch,
            "seconds": round(seconds, 4),
            "elapsed": round(elapsed, 3),
            **scalars,
            **{k: round(v, 1) for k, v in _peak_memory_mb().items()},
        }
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if state.iteration % self.print_every == 0 or state.iteration in (self._start_iteration + 1, total):
            per_iteration = elapsed / max(done, 1)
            values = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            logger.info(
                "%s: epoch %d/%d, iteration %d/%d, %s, %.2f s/it, elapsed %s, left %s",
                self.tag,
                state.epoch,
                state.max_epochs,
                state.iteration,
                total,
                values,
                per_iteration,
                _format_duration(elapsed),
                _format_duration(per_iteration * (total - state.iteration)),
            )


def read_training_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a :class:`TrainingProgress` log, one per iteration in order (the last entry of an
    iteration that a resumed run repeated)."""
    entries: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                entries[int(entry["iteration"])] = entry
    return [entries[k] for k in sorted(entries)]


class BestModelSaver:
    """Save the network whenever a validation metric reaches a new best (main process only).

    The file is the network's flat state dict (``network_def`` of the bundle, what the Model Zoo and MONAI
    Label load), written atomically. The first validation always saves, even if its metric is NaN (e.g. a
    validation set without lesions), so that a model exists after any training run. Its ``state_dict``
    keeps the best value, so a resumed run keeps comparing with it.

    Args:
        network: the network (DDP wrappers are unwrapped).
        save_path: e.g. ``models/model.pt``.
        metric_name: the evaluator metric to watch, e.g. ``"val_mean_dice"``.
        higher_is_better: whether larger metric values are better.
    """

    def __init__(
        self,
        network: nn.Module,
        save_path: str | os.PathLike,
        metric_name: str,
        higher_is_better: bool = True,
    ) -> None:
        self.network = network
        self.save_path = Path(save_path)
        self.metric_name = metric_name
        self.higher_is_better = higher_is_better
        self.best: float | None = None
        self.saved = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "saved": self.saved}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.saved = bool(state["saved"])

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        value = engine.state.metrics.get(self.metric_name)
        value = float(value) if value is not None else math.nan
        improved = not math.isnan(value) and (
            self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        )
        if not improved and self.saved:
            return
        if improved:
            self.best = value
        state = {k: v.detach().cpu() for k, v in unwrap_model(self.network).state_dict().items()}
        atomic_save(state, self.save_path)
        self.saved = True
        logger.info(
            "%s = %.4f at epoch %d (best %s): saved %s",
            self.metric_name,
            value,
            engine.state.epoch,
            "none yet" if self.best is None else f"{self.best:.4f}",
            self.save_path,
        )


class SegmentationMetricsSaver:
    """DSC and NSD of every evaluated case and class, written as CSV and JSON when the evaluation ends.

    Predictions must already be label maps in the original geometry of their image (``Invertd`` then
    ``AsDiscreted(argmax=True)`` in the evaluator's postprocessing), and references loaded in their own
    geometry (:func:`~anatomask_components.evaluation.reference_label_transforms`), so that the scores are
    those of the files a user gets, at the native resolution. See :mod:`anatomask_components.evaluation`
    for the metrics and the convention for empty masks.

    Args:
        output_dir: folder of ``metrics.csv`` (one row per case and class) and ``summary.json`` (mean, SD).
        labels: ``{label id: name}`` (ids may be strings, as in JSON; background 0 is skipped).
        tolerance_mm: NSD tolerance, one value or ``{class name: mm}``.
        lesion_volumes: also report false-positive and false-negative volumes (AutoPET).
        empty_score: DSC/NSD when a class is absent from both maps (NaN: not counted in means).
        prediction_dir: if given, also write each prediction there as ``<case>_seg.nii.gz``.
        pred_key, label_key, case_key: keys of the prediction, the reference and the case name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        labels: Mapping[str | int, str],
        tolerance_mm: float | Mapping[str, float] = DEFAULT_TOLERANCE_MM,
        lesion_volumes: bool = False,
        empty_score: float = math.nan,
        prediction_dir: str | os.PathLike | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        case_key: str = "case",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.prediction_dir = Path(prediction_dir) if prediction_dir else None
        self.labels = {int(k): v for k, v in labels.items() if int(k) != 0}
        self.tolerance_mm = tolerance_mm
        self.lesion_volumes = lesion_volumes
        self.empty_score = float(empty_score)
        self.pred_key = pred_key
        self.label_key = label_key
        self.case_key = case_key
        self.rows: list[dict[str, Any]] = []

    @property
    def csv_path(self) -> Path:
        return self.output_dir / "metrics.csv"

    @property
    def summary_path(self) -> Path:
        return self.output_dir / "summary.json"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def update(self, engine: Engine) -> None:
        """Score the decollated cases of the current iteration."""
        batch, output = engine.state.batch, engine.state.output
        for item, result in zip(batch, output):
            reference = result.get(self.label_key, item.get(self.label_key))
            case = str(item.get(self.case_key) or Path(source_name(reference)).name)
            if self.prediction_dir is not None:
                write_label_map(self.prediction_dir / f"{case}_seg.nii.gz", result[self.pred_key])
            pred, ref, affine = align_to_reference(result[self.pred_key], reference, case)
            rows = case_metrics(
                pred,
                ref,
                voxel_spacing(affine),
                self.labels,
                self.tolerance_mm,
                lesion_volumes=self.lesion_volumes,
                empty_score=self.empty_score,
                case=case,
            )
            dsc = [r["dsc"] for r in rows if not math.isnan(r["dsc"])]
            logger.info("%s: mean DSC %s", case, f"{np.mean(dsc):.4f}" if dsc else "n/a (all classes empty)")
            self.rows.extend(rows)

    def write(self, engine: Engine | None = None) -> dict[str, Any] | None:
        """Write the CSV and the JSON summary, and log the summary table."""
        if not is_main_process():
            return None
        summary = write_metrics(self.rows, self.csv_path, self.summary_path)
        logger.info("metrics: %s, %s\n%s", self.csv_path, self.summary_path, format_report(summary))
        return summary
