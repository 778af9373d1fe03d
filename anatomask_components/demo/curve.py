"""DSC on the unseen case against fine-tuning iterations, from the checkpoints a fine-tuning run kept.

Each ``runs/checkpoints/checkpoint_<iteration>.pt`` of a demo fine-tuning folder is loaded into the run's
network and segments the test case exactly as the bundle's inference does (its preprocessing with the run's
fingerprint, the sliding window with the run's ROI, overlap, Gaussian weighting and padding 0), and the
label map is scored on the fine-tuning grid against the reference resampled there (nearest neighbour). The
evaluate stage scores the final model in the case's own geometry; this curve shows whether more iterations
would have helped.
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

__all__ = ["dsc_curve", "organ_hu"]


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
    fingerprint = model_fingerprint(None, folder / "models" / "model.pt")
    scheme = "ct" if fingerprint is not None else "zscore"
    case = deterministic_transforms("image", "label", settings["spacing"], scheme, fingerprint)(
        dict(test_item)
    )
    image = case["image"].as_tensor()[None].float()
    reference = case["label"].as_tensor()[0].round().to(torch.int64).numpy()
    network = STUNet(1, num_classes, depths=list(settings["depths"]), dims=list(settings["dims"]))
    network.eval()
    inferer = SlidingWindowInferer(
        roi_size=list(settings["roi_size"]),
        sw_batch_size=1,
        overlap=settings["sw_overlap"],
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
    )
    curve = []
    for path in reversed(find_checkpoints(folder / "runs" / "checkpoints")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        prediction = inferer(image, network).argmax(1)[0].numpy()
        rows = case_metrics(prediction, reference, settings["spacing"], organs)
        iteration = int(state["trainer"]["iteration"])
        curve.append({"iteration": iteration, "dsc": {row["name"]: row["dsc"] for row in rows}})
    return curve


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
