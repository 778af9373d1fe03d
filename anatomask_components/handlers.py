"""Ignite handlers of the bundles.

- :class:`TrainingProgress`: progress lines with the time left, and a JSON-lines log of every iteration's
  scalars (all bundles).
- :class:`PretrainedWeightsLoader`: initialise the network from pretrained weights at the start of training
  and log what was loaded (MONAI's ``CheckpointLoader(strict_shape=False)`` silently loads nothing).
- :class:`BestModelSaver`: write ``models/model.pt`` (flat state dict, atomically) when validation improves.
- :class:`SegmentationMetricsSaver`: DSC and NSD per case and class in the original image space, written as
  CSV and a JSON summary when an evaluation ends.
- :class:`CaseInference`: the process function of the inference evaluator: one case at a time, written as a
  label map in the input's geometry, with progress lines (case start, sliding-window progress, seconds per
  case); a case that fails is logged and skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.networks.utils import eval_mode
from monai.utils import ensure_tuple_rep, fall_back_tuple

from anatomask_components.checkpointing import atomic_save
from anatomask_components.data.validation import GRID_TOLERANCE_MM, find_invalid_scan_error, source_name
from anatomask_components.data.writers import write_volume
from anatomask_components.evaluation import (
    DEFAULT_TOLERANCE_MM,
    atomic_write_text,
    case_metrics,
    format_report,
    voxel_spacing,
    write_metrics,
)
from anatomask_components.teacher import unwrap_model
from anatomask_components.weights import WeightTransferReport, transfer_weights

__all__ = [
    "BestModelSaver",
    "CaseInference",
    "PretrainedWeightsLoader",
    "SegmentationMetricsSaver",
    "TrainingProgress",
    "read_training_log",
    "align_to_reference",
    "sliding_window_count",
    "write_label_map",
]

logger = logging.getLogger(__name__)


def _is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _error_message(error: BaseException) -> str:
    """The innermost cause of an error (MONAI wraps transform errors in 'applying transform ...')."""
    invalid = find_invalid_scan_error(error)
    if invalid is not None:
        return str(invalid)
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


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
        if self.report_path is not None and _is_main_process():
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
        if self.log_path is not None and _is_main_process():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self._start_iteration == 0:
                self.log_path.write_text("")

    def __call__(self, engine: Engine) -> None:
        if not _is_main_process():
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
        if not _is_main_process():
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


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a (H, W, D) array to the axis order closest to RAS (exact: permutes and flips only)."""
    orientation = nib.orientations.io_orientation(affine)
    reoriented = nib.orientations.apply_orientation(array, orientation)
    return reoriented, affine @ nib.orientations.inv_ornt_aff(orientation, array.shape)


def align_to_reference(
    prediction: MetaTensor, reference: MetaTensor, case: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bring a prediction and a reference label map onto one voxel grid, exactly.

    The prediction is in its input image's geometry; the reference label file may store the same voxels
    with axes permuted or flipped (e.g. a NIfTI label of a DICOM series). If the two grids differ, both
    are reoriented to RAS, which makes equal grids identical.

    Args:
        prediction: (1, H, W, D) label map with its affine.
        reference: (1, H', W', D') label map with its affine.
        case: named in errors.

    Returns:
        prediction (H, W, D), reference (H, W, D), and their common affine.

    Raises:
        ValueError: the two describe different grids (other spacing, extent or position).
    """
    pred = np.asarray(prediction.detach().cpu())[0]
    ref = np.asarray(reference.detach().cpu())[0]
    pred_affine = np.asarray(prediction.affine, dtype=np.float64)
    ref_affine = np.asarray(reference.affine, dtype=np.float64)
    if pred.shape != ref.shape or not np.allclose(pred_affine, ref_affine, atol=GRID_TOLERANCE_MM):
        pred, pred_affine = _canonical(pred, pred_affine)
        ref, ref_affine = _canonical(ref, ref_affine)
        if pred.shape != ref.shape or not np.allclose(pred_affine, ref_affine, atol=GRID_TOLERANCE_MM):
            raise ValueError(
                f"{case}: the prediction (shape {pred.shape}) and the reference label "
                f"{source_name(reference)} (shape {ref.shape}) are on different voxel grids; the label must "
                "share the image's grid"
            )
    return pred, ref, ref_affine


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
        if not _is_main_process():
            return None
        summary = write_metrics(self.rows, self.csv_path, self.summary_path)
        logger.info("metrics: %s, %s\n%s", self.csv_path, self.summary_path, format_report(summary))
        return summary


def _write_nifti_atomic(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI through a temporary file in the same folder, so no half-written file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(handle)
    try:
        write_volume(temporary, array, affine)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_label_map(path: str | os.PathLike, label_map: MetaTensor) -> Path:
    """Write a (1, H, W, D) label map with its affine as NIfTI (uint8; uint16 beyond 255), atomically.

    Args:
        path: the ``.nii.gz`` file.
        label_map: integer-valued label map; its ``affine`` is the voxel-to-RAS affine to store.

    Returns:
        the written path.
    """
    labels = np.asarray(label_map.detach().cpu())[0].round()
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return _write_nifti_atomic(
        Path(path), labels.astype(dtype), np.asarray(label_map.affine, dtype=np.float64)
    )


def sliding_window_count(inferer: Any, spatial_shape: Sequence[int]) -> int | None:
    """How many windows ``inferer`` runs on one image of ``spatial_shape`` (None if not a sliding window).

    Mirrors :func:`monai.inferers.sliding_window_inference`: the image is padded to the window size where it
    is smaller, and windows are ``int(roi * (1 - overlap))`` apart (whole extent where roi equals it).
    """
    if not isinstance(inferer, SlidingWindowInferer):
        return None
    spatial_shape = [int(s) for s in spatial_shape]
    roi = fall_back_tuple(inferer.roi_size, spatial_shape)
    image = [max(s, r) for s, r in zip(spatial_shape, roi)]
    overlap = ensure_tuple_rep(inferer.overlap, len(image))
    interval = [r if r == s else max(int(r * (1 - o)), 1) for s, r, o in zip(image, roi, overlap)]
    return len(dense_patch_slices(image, roi, interval))


class _WindowProgress:
    """Wraps the network given to the inferer: counts the windows it runs, times them, logs every tenth.

    A light replacement for ``SlidingWindowInferer(progress=True)``, which needs tqdm (not a dependency) and
    draws a bar that log files do not show well. A retry of the inferer (e.g. ``SlidingWindowInfererAdapt``
    after running out of memory) counts on; the logged numbers stop at 100 %. ``network_seconds`` is the
    time spent inside the network (on a GPU, up to its asynchronous launches), what the rest of the
    inference is compared with.
    """

    def __init__(
        self, network: Callable[..., Any], total: int | None, label: str, start: float, log: bool = True
    ) -> None:
        self.network = network
        self.total = total
        self.label = label
        self.start = start
        self.log = log
        self.done = 0
        self.network_seconds = 0.0
        self._next_tenth = 1

    def __call__(self, windows: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        output = self.network(windows, *args, **kwargs)
        self.network_seconds += time.perf_counter() - started
        self.done += int(windows.shape[0])
        if self.total and self.log:
            tenth = min(10 * self.done // self.total, 10)
            if tenth >= self._next_tenth:
                self._next_tenth = tenth + 1
                logger.info(
                    "%s: sliding window %d%% (%d/%d windows, %.1f s)",
                    self.label,
                    min(100 * self.done // self.total, 100),
                    min(self.done, self.total),
                    self.total,
                    time.perf_counter() - self.start,
                )
        return output


class CaseInference:
    """Process function (``iteration_update``) and handler of an inference ``SupervisedEvaluator``.

    The evaluator's data loader yields raw datalist items (``collate_fn=monai.data.utils.no_collation``).
    Each case is preprocessed, inferred with the evaluator's inferer and network, postprocessed (inverted to
    the input geometry, argmax) and written as ``<output_dir>/<case>_<postfix>.nii.gz`` with the input's
    shape and affine, one at a time. A case that fails anywhere (unreadable scan, out of memory, ...) is
    logged with its error and skipped; the others are written. When the run ends, ``inference_report.json``
    lists the written and the failed cases with the seconds each took (for a written case also per stage:
    ``preprocess``, ``inferer`` (sliding window: windows, blending), ``network`` (inside the network alone),
    ``postprocess`` (inversion to the input grid, argmax) and ``write``); if every case failed, the run
    raises.

    Progress: each case logs ``[i/N] <case>: started``, then (``progress``, sliding-window inferers) a line
    per tenth of its windows, ``[i/N] <case>: sliding window 40% (52/130 windows, 12.3 s)``, and ends with
    ``[i/N] <case>: <label map> (15.0 s)``; the run ends with the total and the mean seconds per case.

    Args:
        preprocessing: the inference preprocessing (invertible, e.g.
            :func:`anatomask_components.data.preprocessing.inference_transforms`).
        postprocessing: turns ``pred`` (network output, C channels) into a (1, H, W, D) label map in the
            input geometry; may also keep the inverted probabilities under ``probabilities_key``.
        output_dir: output folder.
        save_probabilities: also write ``<case>_probabilities.nii.gz`` (H, W, D, C float32), which needs
            ``probabilities_key`` from the postprocessing.
        output_postfix: suffix of the label map file names.
        progress: log the sliding-window progress of each case (every tenth of its windows).
        image_key, pred_key, probabilities_key, case_key: item keys.
    """

    def __init__(
        self,
        preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        postprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        output_dir: str | os.PathLike,
        save_probabilities: bool = False,
        output_postfix: str = "seg",
        progress: bool = True,
        image_key: str = "image",
        pred_key: str = "pred",
        probabilities_key: str = "probabilities",
        case_key: str = "case",
    ) -> None:
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.save_probabilities = save_probabilities
        self.output_postfix = output_postfix
        self.progress = progress
        self.image_key = image_key
        self.pred_key = pred_key
        self.probabilities_key = probabilities_key
        self.case_key = case_key
        self.written: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self._run_start: float | None = None

    @property
    def report_path(self) -> Path:
        return self.output_dir / "inference_report.json"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def reset(self, engine: Engine | None = None) -> None:
        self.written, self.failed = [], []
        self._run_start = time.perf_counter()

    def __call__(self, engine: Engine, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [self.run_case(engine, item) for item in batch]

    def run_case(self, engine: Engine, item: Mapping[str, Any]) -> dict[str, Any]:
        """Segment and write one case; never raises for a case-level failure.

        Returns:
            ``{"case", "label_map", "seconds"}`` (plus ``"probabilities"``), or ``{"case", "image", "error",
            "seconds"}``.
        """
        case = str(item.get(self.case_key) or item[self.image_key])
        progress = f"[{engine.state.iteration}/{engine.state.epoch_length}] {case}"
        start = time.perf_counter()
        logger.info("%s: started", progress)
        stages: dict[str, float] = {}
        try:
            data = self.preprocessing(dict(item))
            inputs = data[self.image_key].unsqueeze(0).to(engine.state.device)
            stages["preprocess"] = time.perf_counter() - start
            windows = sliding_window_count(engine.inferer, inputs.shape[2:])
            if self.progress:
                logger.info(
                    "%s: preprocessed to %s in %.1f s%s",
                    progress,
                    "x".join(str(int(s)) for s in inputs.shape[1:]),
                    stages["preprocess"],
                    f", {windows} sliding windows" if windows else "",
                )
            network = _WindowProgress(engine.network, windows, progress, start, log=self.progress)
            mark = time.perf_counter()
            with eval_mode(engine.network):
                logits = engine.inferer(inputs, network)
            data[self.pred_key] = logits[0].detach().cpu()
            stages["inferer"] = time.perf_counter() - mark
            stages["network"] = network.network_seconds
            del inputs, logits
            mark = time.perf_counter()
            data = self.postprocessing(data)
            stages["postprocess"] = time.perf_counter() - mark
            mark = time.perf_counter()
            label_map = data[self.pred_key]
            affine = np.asarray(label_map.affine, dtype=np.float64)
            labels = np.asarray(label_map.detach().cpu())[0].round()
            dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
            result: dict[str, Any] = {"case": case}
            result["label_map"] = str(
                _write_nifti_atomic(
                    self.output_dir / f"{case}_{self.output_postfix}.nii.gz", labels.astype(dtype), affine
                )
            )
            if self.save_probabilities:
                probabilities = np.asarray(data[self.probabilities_key].detach().cpu(), dtype=np.float32)
                result["probabilities"] = str(
                    _write_nifti_atomic(
                        self.output_dir / f"{case}_probabilities.nii.gz",
                        np.moveaxis(probabilities, 0, -1),
                        affine,
                    )
                )
        except Exception as error:  # a bad case must not stop the others; reported below
            message = _error_message(error)
            seconds = round(time.perf_counter() - start, 2)
            logger.error("%s: FAILED after %.1f s, skipped (%s)", progress, seconds, message)
            failure = {"case": case, "image": item.get(self.image_key), "error": message, "seconds": seconds}
            self.failed.append(failure)
            return failure
        stages["write"] = time.perf_counter() - mark
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["windows"] = windows
        result["stage_seconds"] = {k: round(v, 3) for k, v in stages.items()}
        logger.info("%s: %s (%.1f s)", progress, result["label_map"], result["seconds"])
        self.written.append(result)
        return result

    def finish(self, engine: Engine | None = None) -> None:
        """Write ``inference_report.json`` and log the outcome; raise if no case could be segmented."""
        cases = len(self.written) + len(self.failed)
        total = time.perf_counter() - self._run_start if self._run_start is not None else 0.0
        report = {
            "written": self.written,
            "failed": self.failed,
            "seconds": round(total, 2),
            "seconds_per_case": round(total / cases, 2) if cases else None,
        }
        atomic_write_text(self.report_path, json.dumps(report, indent=4))
        logger.info(
            "inference: %d case(s) written, %d failed in %.1f s (%.1f s per case); report %s",
            len(self.written),
            len(self.failed),
            total,
            total / max(cases, 1),
            self.report_path,
        )
        for failure in self.failed:
            logger.warning("failed case %s: %s", failure["case"], failure["error"])
        if self.failed and not self.written:
            raise RuntimeError(f"all {len(self.failed)} case(s) failed; see {self.report_path}")
