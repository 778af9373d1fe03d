"""How a demo fine-tuning run segments: DSC on the unseen case against fine-tuning iterations, from the
checkpoints the run kept, and thin slabs of the training case against the whole scan.

Each ``runs/checkpoints/checkpoint_<iteration>.pt`` of a demo fine-tuning folder is loaded into the run's
network and segments the test case exactly as the bundle's inference does (its preprocessing with the run's
fingerprint, the sliding window with the run's ROI, overlap, Gaussian weighting and padding 0), and the
label map is scored on the fine-tuning grid against the reference resampled there (nearest neighbour). The
evaluate stage scores the final model in the case's own geometry; this curve shows whether more iterations
would have helped. :func:`slab_agreement` asks the run's model (``models/model.pt``) to label slabs as thin
as case C on their own and compares them with its label map of the whole scan on the same slices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from anatomask_components.checkpointing import find_checkpoints
from anatomask_components.data.fingerprint import model_fingerprint
from anatomask_components.data.preprocessing import deterministic_transforms
from anatomask_components.evaluation import case_metrics
from anatomask_components.networks import STUNet

__all__ = ["dsc_curve", "organ_hu", "slab_agreement", "slabs_against_whole"]


@torch.no_grad()
def dsc_curve(
    run_folder: str | os.PathLike,
    settings: Mapping[str, Any],
    test_item: Mapping[str, Any],
    organs: Mapping[int, str],
    num_classes: int,
) -> list[dict[str, Any]]:
    """DSC per organ on ``test_item`` for every kept checkpoint of a fine-tuning run.

    Args:
        run_folder: a demo fine-tuning folder (``runs/checkpoints``, ``models/fingerprint.json``).
        settings: the demo's settings (``spacing``, ``roi_size``, ``depths``, ``dims``, ``sw_overlap``).
        test_item: ``{"image": path, "label": path}`` of the unseen case, labels in the bundle's ids.
        organs: label id -> name of the organs to score.
        num_classes: output channels of the network.

    Returns:
        one ``{"iteration": int, "dsc": {name: float}}`` per checkpoint, in increasing iteration.
    """
    folder = Path(run_folder)
    image, reference = _case(folder, settings, test_item)
    network = _network(settings, num_classes)
    inferer = _inferer(settings)
    curve = []
    for path in reversed(find_checkpoints(folder / "runs" / "checkpoints")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        prediction = inferer(image, network).argmax(1)[0].numpy()
        rows = case_metrics(prediction, reference, settings["spacing"], organs)
        iteration = int(state["trainer"]["iteration"])
        curve.append({"iteration": iteration, "dsc": {row["name"]: row["dsc"] for row in rows}})
    return curve


@torch.no_grad()
def slab_agreement(
    run_folder: str | os.PathLike,
    settings: Mapping[str, Any],
    item: Mapping[str, Any],
    organs: Mapping[int, str],
    num_classes: int,
    thickness_mm: float,
    count: int = 4,
    min_voxels: int = 50,
) -> dict[str, Any]:
    """How a run's model labels slabs of a scan on their own, against its label map of the whole scan
    (:func:`slabs_against_whole` with the run's ``models/model.pt`` and preprocessing).

    Args:
        run_folder: a demo fine-tuning folder (``models/model.pt``, ``models/fingerprint.json``).
        settings: the demo's settings (``spacing``, ``roi_size``, ``depths``, ``dims``, ``sw_overlap``).
        item: ``{"image": path, "label": path}``, labels in the bundle's ids (the training case: the model
            fits it, so that the whole-scan label map is worth agreeing with).
        organs, thickness_mm, count, min_voxels: see :func:`slabs_against_whole`.
        num_classes: output channels of the network.

    Returns:
        :func:`slabs_against_whole`'s result.
    """
    folder = Path(run_folder)
    image, reference = _case(folder, settings, item)
    network = _network(settings, num_classes)
    network.load_state_dict(torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True))
    return slabs_against_whole(
        network, image, reference, settings, organs, thickness_mm, count, min_voxels, str(item["image"])
    )


@torch.no_grad()
def slabs_against_whole(
    network: torch.nn.Module,
    image: torch.Tensor,
    reference: np.ndarray,
    settings: Mapping[str, Any],
    organs: Mapping[int, str],
    thickness_mm: float,
    count: int = 4,
    min_voxels: int = 50,
    name: str = "scan",
) -> dict[str, Any]:
    """A network's label maps of slabs of a scan, each labelled on its own, against its whole-scan label map.

    ``count`` slabs of ``thickness_mm`` (rounded to whole slices of the grid), spread evenly over the slices
    where the reference holds the first of ``organs``, each go through the sliding window alone, padded as
    inference pads a thin scan.

    Args:
        network: the segmentation network, in eval mode.
        image: the preprocessed scan, (1, 1, H, W, D) on the grid of ``settings["spacing"]``.
        reference: its labels on the same grid, (H, W, D).
        settings: ``spacing``, ``roi_size`` and ``sw_overlap`` of the sliding window.
        organs: label id -> name of the organs to compare; the first one places the slabs.
        thickness_mm: slab thickness (case C: 20 slices of 2 mm).
        count: number of slabs.
        min_voxels: an organ counts in a slab when the reference and the whole-scan label map both hold
            at least this many of its voxels there.
        name: the scan, for errors.

    Returns:
        ``{"thickness_slices": int, "whole": {name: DSC of the whole-scan label map against the reference},
        "slabs": [{"start": first slice, "agreement": {name: DSC of the slab's label map against the
        whole-scan label map on the same slices}, "reference": {name: DSC of the slab's label map against the
        reference}}]}``.

    Raises:
        ValueError: the first organ spans fewer slices than a slab.
    """
    inferer = _inferer(settings)
    whole = inferer(image, network).argmax(1)[0].numpy()
    spacing = tuple(settings["spacing"])
    thickness = max(1, int(round(thickness_mm / spacing[2])))
    first_organ = next(iter(organs))
    slices = np.flatnonzero((reference == first_organ).sum(axis=(0, 1)) >= min_voxels)
    if slices.size < thickness:
        raise ValueError(f"{name}: {organs[first_organ]} spans fewer than {thickness} slices")
    slabs = []
    for start in np.linspace(slices[0], slices[-1] + 1 - thickness, count).round().astype(int).tolist():
        window = slice(start, start + thickness)
        labelled = inferer(image[..., window].clone(), network).argmax(1)[0].numpy()
        present = {
            k: organ
            for k, organ in organs.items()
            if (reference[..., window] == k).sum() >= min_voxels
            and (whole[..., window] == k).sum() >= min_voxels
        }
        slabs.append(
            {
                "start": start,
                "agreement": _dsc(labelled, whole[..., window], spacing, present),
                "reference": _dsc(labelled, reference[..., window], spacing, present),
            }
        )
    return {"thickness_slices": thickness, "whole": _dsc(whole, reference, spacing, organs), "slabs": slabs}


def _dsc(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], organs: Mapping[int, str]
) -> dict[str, float]:
    return (
        {row["name"]: row["dsc"] for row in case_metrics(prediction, reference, spacing, organs)}
        if organs
        else {}
    )


def _case(
    folder: Path, settings: Mapping[str, Any], item: Mapping[str, Any]
) -> tuple[torch.Tensor, np.ndarray]:
    """A labelled case preprocessed as the run's inference preprocesses it: image (1, 1, H, W, D), labels."""
    fingerprint = model_fingerprint(None, folder / "models" / "model.pt")
    scheme = "ct" if fingerprint is not None else "zscore"
    case = deterministic_transforms("image", "label", settings["spacing"], scheme, fingerprint)(dict(item))
    image = case["image"].as_tensor()[None].float()
    return image, case["label"].as_tensor()[0].round().to(torch.int64).numpy()


def _network(settings: Mapping[str, Any], num_classes: int) -> STUNet:
    network = STUNet(1, num_classes, depths=list(settings["depths"]), dims=list(settings["dims"]))
    return network.eval()


def _inferer(settings: Mapping[str, Any]) -> SlidingWindowInferer:
    """The bundles' sliding window with the demo's ROI and overlap (padding 0, as in training)."""
    return SlidingWindowInferer(
        roi_size=list(settings["roi_size"]),
        sw_batch_size=1,
        overlap=settings["sw_overlap"],
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
    )


def organ_hu(
    item: Mapping[str, Any], organs: Mapping[int, str], spacing: Sequence[float]
) -> dict[str, float]:
    """Median HU of each organ of a labelled case on the fine-tuning grid (NaN where the organ is absent)."""
    case = deterministic_transforms("image", "label", spacing, "none")(dict(item))
    image = case["image"].as_tensor()[0].numpy()
    label = case["label"].as_tensor()[0].round().numpy()
    return {
        name: float(np.median(image[label == k])) if (label == k).any() else float("nan")
        for k, name in organs.items()
    }
