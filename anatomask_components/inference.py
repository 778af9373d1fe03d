"""Inference engines: process functions of the bundles' inference evaluators.

- :class:`CaseInference`: the process function of the fine-tuning bundles' inference evaluator: one case at
  a time, written as a label map in the input's geometry, with progress lines (case start, sliding-window
  progress, seconds per case); a case that fails is logged and skipped.
- :class:`ReconstructionInference`: the pretraining bundle's evaluator step that shows what a pretrained
  network reconstructs (masked input, reconstruction, per-patch scores).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import dense_patch_slices
from monai.engines.utils import IterationEvents
from monai.inferers import SlidingWindowInferer
from monai.networks.utils import eval_mode
from monai.utils import ensure_tuple_rep, fall_back_tuple

from anatomask_components.data.validation import find_invalid_scan_error
from anatomask_components.data.writers import write_volume_atomic
from anatomask_components.files import atomic_write_text
from anatomask_components.masking import num_hard, num_masked, random_patch_mask, reconstruction_guided_mask
from anatomask_components.strategies import masked_patch_errors
from anatomask_components.teacher import unwrap_model

__all__ = [
    "CaseInference",
    "ReconstructionInference",
    "sliding_window_count",
]

logger = logging.getLogger(__name__)


def _error_message(error: BaseException) -> str:
    """The innermost cause of an error (MONAI wraps transform errors in 'applying transform ...')."""
    invalid = find_invalid_scan_error(error)
    if invalid is not None:
        return str(invalid)
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


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
                write_volume_atomic(
                    self.output_dir / f"{case}_{self.output_postfix}.nii.gz", labels.astype(dtype), affine
                )
            )
            if self.save_probabilities:
                probabilities = np.asarray(data[self.probabilities_key].detach().cpu(), dtype=np.float32)
                result["probabilities"] = str(
                    write_volume_atomic(
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


class ReconstructionInference:
    """Evaluator step that shows what a pretrained network learned, for ``SupervisedEvaluator``.

    For each scan (padded to a multiple of the mask unit) it draws a random mask, lets ``scorer`` rank
    the masked patches with the training teacher's score
    (:func:`~anatomask_components.strategies.masked_patch_errors`; ``hard_ratio`` of them become the
    hardest, as in training), reconstructs with ``network`` and returns, as MetaTensors on the image's grid:
    ``masked`` (the network's input), ``reconstruction`` (de-normalised with each patch's own mean and
    standard deviation, visible patches pasted from the input) and ``scores`` (the per-patch score,
    constant within a patch; 0 on patches the scorer did not see).

    Args:
        mask_ratio: fraction of masked patches.
        hard_ratio: fraction of masked patches chosen by score (``r_T`` = 0.5 shows the final state).
        scorer: network that scores patches (the teacher); ``None`` uses the evaluated network.
        teacher_target: ``"raw"`` or ``"normalized"``, as in training.
        seed: seed of the random part of the mask.
        image_key: key of the image in the batch.
    """

    def __init__(
        self,
        mask_ratio: float = 0.6,
        hard_ratio: float = 0.5,
        scorer: torch.nn.Module | None = None,
        teacher_target: Literal["raw", "normalized"] = "raw",
        seed: int = 0,
        image_key: str = "image",
    ) -> None:
        self.mask_ratio = mask_ratio
        self.hard_ratio = hard_ratio
        self.scorer = scorer
        self.teacher_target = teacher_target
        self.seed = seed
        self.image_key = image_key

    @torch.no_grad()
    def __call__(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        from monai.data import MetaTensor

        from anatomask_components.patches import paste_reconstruction, patch_grid, patchify, unpatchify

        network = engine.network
        network.eval()
        device = engine.state.device or torch.device("cpu")
        image = batchdata[self.image_key]
        x = (image.as_tensor() if hasattr(image, "as_tensor") else image).to(
            device=device, dtype=torch.float32
        )
        model = unwrap_model(network)
        patch = model.patch_size
        grid = patch_grid(x.shape[2:], patch)
        length = model.num_patches(x.shape[2:])
        generator = torch.Generator(device=device).manual_seed(self.seed)
        mask = random_patch_mask(x.shape[0], length, self.mask_ratio, generator=generator, device=device)
        scorer = self.scorer if self.scorer is not None else network
        scorer.eval()
        scores = masked_patch_errors(scorer, x, mask, patch, self.teacher_target)
        if num_hard(num_masked(length, self.mask_ratio), self.hard_ratio) > 0:
            mask = reconstruction_guided_mask(
                scores, self.mask_ratio, self.hard_ratio, candidates=mask, generator=generator
            )
        composite = paste_reconstruction(network(x, mask), x, mask, patch)
        target = patchify(x, patch)
        visible = (~mask)[..., None].to(x.dtype)
        per_voxel_scores = scores[..., None].expand_as(target)

        def like_image(t: torch.Tensor) -> torch.Tensor:
            return (
                MetaTensor(t.cpu(), meta=getattr(image, "meta", {}), applied_operations=[])
                if hasattr(image, "meta")
                else t.cpu()
            )

        engine.state.output = {
            self.image_key: image,
            "masked": like_image(unpatchify(target * visible, patch, grid)),
            "reconstruction": like_image(composite),
            "scores": like_image(unpatchify(per_voxel_scores, patch, grid)),
            "mask": mask.cpu(),
        }
        # MONAI decollates and post-processes on this event, which its own iteration would fire
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
