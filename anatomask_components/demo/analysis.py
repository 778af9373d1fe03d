"""What the demo's teachers find hard, measured on real CT.

For each labelled example case (A, the fine-tuning case, and C, the test series) on the pretraining grid,
many random masks are drawn; a scorer network reconstructs each masked input and its ``k = floor(n_masked *
r_T)`` highest-scoring masked patches are the ones AnatoMask would mask for the student. We measure which
share of those patches' volume lies inside the body (CT > -500 HU) and inside the FLARE22 organs, against
the share of all masked patches (what ``k`` random patches hold on average), for three scorers of the same
shape: an untrained network, the EMA teacher of the SparK run and the EMA teacher of the AnatoMask run; and
for both teacher targets (``raw``, the reference's, and ``normalized``). With the raw target part of the
"anatomy" is there before any training, because the score of a patch then grows with its own intensity
energy; the untrained row shows how much.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anatomask_components.checkpointing import latest_checkpoint
from anatomask_components.data.fingerprint import model_fingerprint
from anatomask_components.data.preprocessing import deterministic_transforms
from anatomask_components.masking import (
    hardest_patches,
    num_hard,
    num_masked,
    random_patch_mask,
    reconstruction_guided_mask,
)
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.patches import paste_reconstruction, patch_grid, patchify, unpatchify
from anatomask_components.strategies import masked_patch_errors

__all__ = ["CaseVolumes", "analyse_pretraining", "load_case", "topk_statistics"]

BODY_HU = -500.0
TARGETS = ("raw", "normalized")
SCORERS = {
    "untrained": "untrained network (same shape, seed's initialisation)",
    "spark_teacher": "EMA teacher of the SparK run",
    "anatomask_teacher": "EMA teacher of the AnatoMask run",
}


@dataclass
class CaseVolumes:
    """One case on the pretraining grid, padded to whole patches.

    Attributes:
        name: case name.
        image: ``(1, 1, H, W, D)`` normalised CT, the network input.
        hu: ``(H, W, D)`` CT in HU.
        body: ``(H, W, D)`` bool, CT above -500 HU.
        labels: ``(H, W, D)`` FLARE22 label ids (0 background).
    """

    name: str
    image: torch.Tensor
    hu: np.ndarray
    body: np.ndarray
    labels: np.ndarray


def load_case(
    item: dict[str, Any], spacing, patch_size, name: str, fingerprint: dict[str, Any] | None = None
) -> CaseVolumes:
    """Read a labelled case as the pretraining bundle sees it (RAS, ``spacing``, nnU-Net's CT scheme with the
    pretraining run's ``fingerprint``; per-image z-score without one) and pad it to whole patches with air."""
    scheme = "ct" if fingerprint is not None else "zscore"
    normalised = deterministic_transforms("image", "label", spacing, scheme, fingerprint)(dict(item))
    raw = deterministic_transforms("image", "label", spacing, "none")(dict(item))
    image = normalised["image"].as_tensor().float()[0]
    hu = raw["image"].as_tensor().float()[0]
    labels = normalised["label"].as_tensor()[0].round().to(torch.int64)
    pad = [(-s) % p for s, p in zip(image.shape, patch_size)]
    padding = [v for p in reversed(pad) for v in (0, p)]  # F.pad order: last axis first
    image = torch.nn.functional.pad(image, padding, value=float(image.min()))
    hu = torch.nn.functional.pad(hu, padding, value=-1024.0)
    labels = torch.nn.functional.pad(labels, padding, value=0)
    return CaseVolumes(name, image[None, None], hu.numpy(), (hu > BODY_HU).numpy(), labels.numpy())


def _patch_fractions(volume: np.ndarray, patch_size) -> torch.Tensor:
    """``(L,)`` fraction of each patch's voxels where ``volume`` is True."""
    return patchify(torch.from_numpy(volume)[None, None].float(), patch_size)[0].mean(dim=-1)


def _masks(num_patches: int, mask_ratio: float, count: int, seed: int) -> list[torch.Tensor]:
    """The random masks the analysis shares between scorers (``(1, L)`` bool each)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    return [random_patch_mask(1, num_patches, mask_ratio, generator=generator) for _ in range(count)]


@torch.no_grad()
def topk_statistics(
    scorer: torch.nn.Module,
    case: CaseVolumes,
    masks: list[torch.Tensor],
    hard_ratio: float,
    mask_ratio: float,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Body and organ share of the scorer's top-k masked patches, per teacher target.

    Args:
        scorer: a pretraining network (eval mode is set here).
        case: the case.
        masks: random masks ``(1, L)``.
        hard_ratio: ``r_T``; ``k = floor(n_masked * r_T)``.
        mask_ratio: the masks' ratio.
        device: where the scorer runs.

    Returns:
        ``{target: {"topk_body", "topk_organs", "random_body", "random_organs", "k", "masks"}}``: mean shares
        of the top-k patches' volume and of all masked patches' volume (the expectation for k random picks).
    """
    scorer = scorer.to(device).eval()
    patch = scorer.patch_size
    x = case.image.to(device)
    body = _patch_fractions(case.body, patch)
    organs = _patch_fractions(case.labels > 0, patch)
    k = num_hard(num_masked(body.numel(), mask_ratio), hard_ratio)
    sums = {t: np.zeros(4) for t in TARGETS}
    for mask in masks:
        mask = mask.to(device)
        candidates = mask[0].cpu()
        for target in TARGETS:
            scores = masked_patch_errors(scorer, x, mask, patch, target)
            top = hardest_patches(scores, k, candidates=mask)[0].cpu()
            sums[target] += [
                body[top].mean().item(),
                organs[top].mean().item(),
                body[candidates].mean().item(),
                organs[candidates].mean().item(),
            ]
    keys = ("topk_body", "topk_organs", "random_body", "random_organs")
    return {
        t: {**dict(zip(keys, (sums[t] / len(masks)).tolist())), "k": k, "masks": len(masks)} for t in TARGETS
    }


def pretrain_network(settings) -> AnatoMaskPretrainModel:
    """The demo's pretraining network (the bundle's defaults with the demo's depths and widths)."""
    return AnatoMaskPretrainModel(STUNet(1, 1, depths=list(settings["depths"]), dims=list(settings["dims"])))


def load_teacher(run_folder: Path, settings) -> AnatoMaskPretrainModel:
    """The EMA teacher of a pretraining run, from its newest training checkpoint."""
    path = latest_checkpoint(run_folder / "runs" / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"no training checkpoint in {run_folder / 'runs' / 'checkpoints'}")
    network = pretrain_network(settings)
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["teacher"]["teacher"])
    return network


def load_student(run_folder: Path, settings) -> AnatoMaskPretrainModel:
    """The exported student (``models/model.pt``) of a pretraining run."""
    network = pretrain_network(settings)
    network.load_state_dict(
        torch.load(run_folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    )
    return network


def untrained_network(settings) -> AnatoMaskPretrainModel:
    """A network of the same shape at the initialisation of the run's seed."""
    torch.manual_seed(int(settings["seed"]))
    return pretrain_network(settings)


@torch.no_grad()
def figure_slices(
    case: CaseVolumes,
    teacher: torch.nn.Module,
    untrained: torch.nn.Module,
    student: torch.nn.Module,
    mask: torch.Tensor,
    hard_ratio: float,
    mask_ratio: float,
    device: torch.device,
    seed: int,
) -> dict[str, np.ndarray]:
    """The arrays of the paper-style figure on the axial slice of ``case`` with the most organ voxels.

    Returns:
        2D arrays (RAS x, y): ``image`` (z-scored input), ``hu``, ``labels``, ``teacher_scores`` and
        ``untrained_scores`` (raw target, NaN on patches visible to the teacher), ``random_mask``,
        ``anatomask_mask`` (0 visible, 1 random part, 2 chosen by the teacher) and ``reconstruction`` (the
        AnatoMask student's output on the AnatoMask mask, visible patches pasted from the input); and
        ``slice`` (the axial index).
    """
    patch = teacher.patch_size
    grid = patch_grid(case.image.shape[2:], patch)
    x = case.image.to(device)
    mask = mask.to(device)

    def per_voxel(values: torch.Tensor) -> np.ndarray:
        return (
            unpatchify(values[..., None].float().expand(-1, -1, math.prod(patch)), patch, grid)[0, 0]
            .cpu()
            .numpy()
        )

    raw_scores = {
        name: masked_patch_errors(scorer.to(device).eval(), x, mask, patch)
        for name, scorer in (("teacher_scores", teacher), ("untrained_scores", untrained))
    }
    maps = {name: per_voxel(scores.masked_fill(~mask, math.nan)) for name, scores in raw_scores.items()}
    teacher_scores = raw_scores["teacher_scores"]
    generator = torch.Generator(device=device).manual_seed(seed)
    final = reconstruction_guided_mask(
        teacher_scores, mask_ratio, hard_ratio, candidates=mask, generator=generator
    )
    k = num_hard(num_masked(mask.shape[1], mask_ratio), hard_ratio)
    hard = hardest_patches(teacher_scores, k, candidates=mask)
    student = student.to(device).eval()
    reconstruction = paste_reconstruction(student(x, final), x, final, patch)[0, 0].cpu().numpy()
    z = int(np.argmax((case.labels > 0).sum(axis=(0, 1))))
    volumes = {
        "image": case.image[0, 0].numpy(),
        "hu": case.hu,
        "labels": case.labels,
        "random_mask": per_voxel(mask),
        "anatomask_mask": per_voxel(final.float() + hard.float()),
        "reconstruction": reconstruction,
        **maps,
    }
    return {**{k: v[:, :, z] for k, v in volumes.items()}, "slice": np.asarray(z)}


def analyse_pretraining(
    output: str | os.PathLike, settings: dict[str, Any] | Any, datalist: Path
) -> dict[str, Any]:
    """Top-k statistics for every scorer and target on cases A and C, and the figure data.

    Args:
        output: the demo's output folder (holding ``pretrain_spark`` and ``pretrain_anatomask``).
        settings: :class:`~anatomask_components.demo.settings.DemoSettings` (or its dict).
        datalist: the FLARE22 datalist of the examples (case A in ``training``, C in ``test``).

    Returns:
        ``{"statistics": {case: {scorer: {target: {...}}}}, "mean": {scorer: {target: {...}}}, "figure_data":
        path of the npz with the figure slices, "scorers": descriptions}``.
    """
    from dataclasses import asdict, is_dataclass

    settings = asdict(settings) if is_dataclass(settings) else dict(settings)
    output = Path(output)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lists = json.loads(Path(datalist).read_text(encoding="utf-8"))
    items = {"A": lists["training"][0], "C": lists["test"][0]}
    scorers = {
        "untrained": untrained_network(settings),
        "spark_teacher": load_teacher(output / "pretrain_spark", settings),
        "anatomask_teacher": load_teacher(output / "pretrain_anatomask", settings),
    }
    student = load_student(output / "pretrain_anatomask", settings)
    patch = scorers["untrained"].patch_size
    statistics: dict[str, Any] = {}
    figure: dict[str, np.ndarray] = {}
    fingerprint = model_fingerprint(None, output / "pretrain_anatomask" / "models" / "model.pt")
    for case_name, item in items.items():
        case = load_case(item, settings["spacing"], patch, case_name, fingerprint)
        length = math.prod(patch_grid(case.image.shape[2:], patch))
        masks = _masks(length, settings["mask_ratio"], settings["analysis_masks"], settings["seed"])
        statistics[case_name] = {
            name: topk_statistics(
                scorer, case, masks, settings["hard_ratio_end"], settings["mask_ratio"], device
            )
            for name, scorer in scorers.items()
        }
        statistics[case_name]["num_patches"] = length
        slices = figure_slices(
            case,
            scorers["anatomask_teacher"],
            scorers["untrained"],
            student,
            masks[0],
            settings["hard_ratio_end"],
            settings["mask_ratio"],
            device,
            settings["seed"],
        )
        figure.update({f"{case_name}_{k}": v for k, v in slices.items()})
        print(
            f"    case {case_name}: {length} patches, {len(masks)} masks, {len(scorers)} scorers", flush=True
        )
    mean = {
        name: {
            target: {
                key: float(np.mean([statistics[c][name][target][key] for c in items]))
                for key in ("topk_body", "topk_organs", "random_body", "random_organs")
            }
            for target in TARGETS
        }
        for name in scorers
    }
    figure_path = output / "analysis" / "figure_data.npz"
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(figure_path, **figure)
    return {
        "statistics": statistics,
        "mean": mean,
        "cases": list(items),
        "figure_data": str(figure_path),
        "scorers": SCORERS,
        "body_hu": BODY_HU,
    }
