"""Reconstruction difficulty of a scan: how hard a pretrained AnatoMask network finds it to fill in.

The score reuses the teacher's signal of pretraining (docs/method.md §6, §9): the network reconstructs masked
patches and each masked patch's error against the bundle's teacher target is its difficulty (the training
teacher's score, :func:`~anatomask_components.strategies.masked_patch_errors`). For a whole scan
:class:`DifficultyScorer`

1. preprocesses it exactly as the bundle's ``inference.json`` does (load, checks, RAS, the bundle's spacing,
   its normalisation with the fingerprint stored beside ``models/model.pt``);
2. tiles the whole volume (padded with its minimum, i.e. air, to a multiple of the mask unit and to at
   least one window) with windows of the bundle's ``roi_size`` aligned to the mask unit, so that every
   window sees the same patch grid; the last window along an axis is moved back to end at the border;
3. in every window draws ``num_masks`` random masks of the bundle's mask ratio as cyclic shifts of one
   seeded permutation of the window's patches (each is a uniform random mask; together they mask every
   patch ``floor(num_masks * ratio)`` times or more), and runs them through the network in batches;
4. averages each patch's error over the masks (and windows) in which it was masked: ``patch_errors``;
5. aggregates over the *body* patches (at least half of their voxels above -500 HU in the stored values
   before normalisation): ``score`` is their mean, ``quantile`` their 0.9 quantile. A scan without body
   patches is aggregated over all its patches.

Everything random comes from ``seed`` and the window's index (not the batch it falls in), and the sparse
instance norm is computed per sample, so a result does not depend on ``batch_size``. The network is the
EMA teacher of the newest training checkpoint when the bundle keeps one (what AnatoMask's teacher scores
with), else the exported student ``models/model.pt`` (see :class:`DifficultyScorer`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImaged, apply_transform

from anatomask_components.checkpointing import find_checkpoints
from anatomask_components.data.examples import sha256_of
from anatomask_components.data.fingerprint import model_fingerprint, needs_fingerprint
from anatomask_components.data.normalization import NormalizeByModalityd
from anatomask_components.data.preprocessing import inference_transforms
from anatomask_components.data.readers import is_resource_error
from anatomask_components.data.validation import InvalidScanError, transform_error_cause
from anatomask_components.data.writers import write_volume
from anatomask_components.determinism import sample_seed
from anatomask_components.masking import num_masked
from anatomask_components.patches import patchify
from anatomask_components.strategies import masked_patch_errors
from anatomask_components.weights import extract_state_dict, load_checkpoint

__all__ = ["BODY_THRESHOLD_HU", "DifficultyScorer", "ScanDifficulty", "intensity_flags", "window_starts"]

logger = logging.getLogger(__name__)

# Lungs and bowel gas lie below it, fat (-100 HU) and every soft tissue above.
BODY_THRESHOLD_HU = -500.0
# A patch is inside the body when at least this fraction of its voxels is.
BODY_PATCH_FRACTION = 0.5
# Where the pretraining bundle's train.json keeps its training checkpoints (output_dir/checkpoints).
CHECKPOINT_FOLDER = Path("runs") / "checkpoints"
WEIGHTS_CHOICES = ("teacher", "student")


@dataclass
class ScanDifficulty:
    """The difficulty of one scan (see the module docstring for the definitions).

    ``patch_errors`` has shape ``(gh, gw, gd)``: the patch grid over the preprocessed volume (RAS at the
    bundle's spacing), in the image's axis order, NaN where a patch was never scored. The fields after
    ``flags`` locate that grid: ``grid_affine`` maps patch indices to RAS mm (patch centres),
    ``original_affine`` and ``original_shape`` are the input file's voxel grid (what :meth:`DifficultyScorer.
    write_map` writes into); ``preview`` is the axial slice through the middle of the preprocessed volume
    in stored values (HU for CT), ``(H, W)``, whose patch row is ``patch_errors[:, :, preview_index //
    patch_size[2]]``.
    """

    path: str
    score: float
    quantile: float
    patch_errors: np.ndarray
    stats: dict[str, float]
    flags: list[str]
    patch_size: tuple[int, int, int] = (16, 16, 16)
    body_patches: np.ndarray | None = None
    grid_affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    original_affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    original_shape: tuple[int, int, int] = (0, 0, 0)
    preview: np.ndarray | None = None
    preview_index: int = 0
    seconds: float = 0.0


def window_starts(length: int, window: int) -> list[int]:
    """Start of each window along one axis: tiles of ``window``, the last one moved back to end at
    ``length`` (``length`` and ``window`` are multiples of the mask unit, so are the starts)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, window))
    return starts + [length - window]


def intensity_flags(
    stats: Mapping[str, float], extent_mm: Sequence[float], window_mm: Sequence[float]
) -> list[str]:
    """Plain-language warnings about a scan's stored values and field of view (CT expected).

    Args:
        stats: the scan's statistics (``hu_p1``, ``hu_p99``, ``body_fraction``).
        extent_mm: size of the preprocessed volume along each axis, mm.
        window_mm: size of the bundle's window along each axis, mm.

    Returns:
        the flags, empty when nothing is odd.
    """
    flags = []
    if stats["hu_p1"] > BODY_THRESHOLD_HU:
        flags.append(
            f"not CT-like intensities: 1st percentile {stats['hu_p1']:.0f} (no air below "
            f"{BODY_THRESHOLD_HU:.0f} HU: not a CT, or stored values without the rescale slope/intercept)"
        )
    if stats["hu_p1"] < -1500:
        flags.append(f"1st percentile {stats['hu_p1']:.0f} HU, below air: padding values or wrong rescale")
    if stats["hu_p99"] > 2000:
        flags.append(f"99th percentile {stats['hu_p99']:.0f} HU: metal, or values scaled wrongly")
    if stats["body_fraction"] < 0.05:
        flags.append(f"body covers only {100 * stats['body_fraction']:.1f} % of the volume")
    axes = ("x (R-L)", "y (A-P)", "z (S-I)")
    for axis, extent, window in zip(axes, extent_mm, window_mm):
        if extent < 0.5 * window:
            flags.append(f"few slices: {extent:.0f} mm along {axis}, under half a window ({window:.0f} mm)")
    return flags


def _intensity_stats(raw: np.ndarray) -> dict[str, float]:
    p1, p50, p99 = np.percentile(raw, [1.0, 50.0, 99.0])
    return {
        "hu_mean": float(raw.mean(dtype=np.float64)),
        "hu_std": float(raw.std(dtype=np.float64)),
        "hu_p1": float(p1),
        "hu_p50": float(p50),
        "hu_p99": float(p99),
        "body_fraction": float((raw > BODY_THRESHOLD_HU).mean()),
    }


class DifficultyScorer:
    """Score scans by how badly a pretrained AnatoMask network reconstructs them.

    Args:
        bundle_dir: a pretraining bundle folder (this repository's ``bundles/anatomask_pretrain`` after
            training, a copy of it, or an unpacked archive) with ``configs/inference.json`` and
            ``models/model.pt`` (and ``models/fingerprint.json`` unless ``inference.json`` holds the
            fingerprint).
        weights: ``"teacher"``: the EMA teacher of the newest readable training checkpoint under
            ``runs/checkpoints/`` (AnatoMask's scorer); a bundle without one (exported archives ship only
            ``models/model.pt``) falls back to the student with a warning, and :attr:`weights_source` says
            so. ``"student"``: ``models/model.pt``. Or the path of a weights file (a flat state dict of
            ``network_def``, or a training checkpoint, whose teacher is taken).
        num_masks: random masks per window (``K``).
        seed: seed of the masks.
        batch_size: (window, mask) pairs per forward pass.
        device: torch device; None: the first CUDA device if there is one, else the CPU.
        quantile: the high quantile reported next to the mean.
        overrides: config values set on top of ``configs/inference.json`` (``{"roi_size": [...]}``).

    Attributes:
        model_digest: sha256 of the weights file used.
        weights_file: that file; weights_source: which network of it, in words.
        roi_size, spacing, mask_ratio, teacher_target, patch_size: what the bundle's config sets.

    Raises:
        FileNotFoundError: no ``configs/inference.json`` or no weights file.
        ValueError: unknown ``weights``, weights that do not fit ``network_def``, a ``"ct"`` normalisation
            without a fingerprint.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        weights: str = "teacher",
        num_masks: int = 4,
        seed: int = 0,
        batch_size: int = 2,
        device: str | torch.device | None = None,
        quantile: float = 0.9,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if num_masks < 1:
            raise ValueError(f"num_masks must be at least 1, got {num_masks}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle_dir = Path(bundle_dir)
        self.num_masks = int(num_masks)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.quantile = float(quantile)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        config_file = self.bundle_dir / "configs" / "inference.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{self.bundle_dir}: not a pretraining bundle (no configs/inference.json)"
            )
        parser = ConfigParser()
        parser.read_config(str(config_file))
        parser["bundle_root"] = str(self.bundle_dir)
        for key, value in (overrides or {}).items():
            parser[key] = value
        # Per-sample statistics in the sparse instance norm: a window's errors must not depend on the other
        # windows of its batch (pooling has no parameters, so the weights fit either way).
        parser["network_def#norm_pooling"] = "sample"
        self.roi_size = tuple(int(r) for r in parser.get_parsed_content("roi_size"))
        spacing = parser.get_parsed_content("spacing")
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.mask_ratio = float(parser.get_parsed_content("mask_ratio"))
        self.teacher_target = str(parser.get_parsed_content("teacher_target"))
        normalization = parser.get_parsed_content("normalization")
        model_path = self.bundle_dir / "models" / "model.pt"
        fingerprint = model_fingerprint(parser.get_parsed_content("fingerprint"), model_path)
        if needs_fingerprint(normalization) and fingerprint is None:
            raise ValueError(
                f"{self.bundle_dir}: the bundle normalises with {normalization!r} but has no fingerprint "
                "(neither in configs/inference.json nor models/fingerprint.json): is it trained?"
            )
        self.transforms = inference_transforms(
            spacing=spacing, normalization=normalization, fingerprint=fingerprint
        )

        self.network = parser.get_parsed_content("network_def")
        self.patch_size = tuple(int(p) for p in self.network.patch_size)
        if any(r % p for r, p in zip(self.roi_size, self.patch_size)):
            raise ValueError(
                f"{config_file}: roi_size {list(self.roi_size)} is not a multiple of the mask unit "
                f"{list(self.patch_size)}"
            )
        self.weights_file, state, self.weights_source = self._weights(weights, model_path)
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ValueError(
                f"{self.weights_file}: the weights do not fit network_def of {config_file} ({first})"
            ) from error
        self.network.to(self.device).eval()
        self.model_digest = sha256_of(self.weights_file)

    def _weights(self, weights: str, model_path: Path) -> tuple[Path, dict[str, torch.Tensor], str]:
        """The weights file, its state dict for ``network_def`` and a description of what it is."""
        if weights == "teacher":
            for checkpoint in find_checkpoints(self.bundle_dir / CHECKPOINT_FOLDER):
                try:
                    state, _ = extract_state_dict(load_checkpoint(checkpoint), "teacher", str(checkpoint))
                except ValueError as error:  # unreadable, or saved without a teacher: try the next one
                    logger.warning("skipping %s: %s", checkpoint, error)
                    continue
                return checkpoint, state, f"EMA teacher of the training checkpoint {checkpoint.name}"
            warnings.warn(
                f"{self.bundle_dir}: no training checkpoint with a teacher under {CHECKPOINT_FOLDER}; "
                "scoring with the exported student models/model.pt",
                stacklevel=3,
            )
            weights, fallback = "student", " (no teacher checkpoint in the bundle)"
        else:
            fallback = ""
        if weights == "student":
            state, _ = extract_state_dict(load_checkpoint(model_path), "student", str(model_path))
            return model_path, state, f"student models/model.pt{fallback}"
        path = Path(weights)
        if not path.is_file():
            raise ValueError(
                f"weights must be {' or '.join(WEIGHTS_CHOICES)} or an existing weights file, got {weights!r}"
            )
        state, kind = extract_state_dict(load_checkpoint(path), "teacher", str(path))
        return path, state, f"{path.name} ({kind})"

    def preprocess(self, path: str | os.PathLike) -> dict[str, Any]:
        """The scan through the bundle's preprocessing.

        Returns:
            ``image`` (C, H, W, D) normalised MetaTensor; ``raw`` (H, W, D) float32 stored values of the
            first channel before normalisation (HU for CT); ``original_affine`` and ``original_shape`` of the
            file.

        Raises:
            InvalidScanError: the file cannot be read or preprocessed; the message names it.
        """
        path = os.fspath(path)
        data: Any = {"image": path}
        raw = original_affine = original_shape = None
        for transform in self.transforms.transforms:
            if isinstance(transform, NormalizeByModalityd):
                raw = np.asarray(data["image"][0].detach().cpu().numpy(), dtype=np.float32)
            try:
                data = apply_transform(transform, data)
            except Exception as error:
                cause = transform_error_cause(error)
                if isinstance(cause, InvalidScanError):
                    raise cause from error
                if is_resource_error(error):
                    raise
                raise InvalidScanError(
                    path, f"cannot be preprocessed ({type(cause).__name__}: {' '.join(str(cause).split())})"
                ) from error
            if isinstance(transform, LoadImaged):
                image = data["image"]
                original_affine = np.asarray(image.affine, dtype=np.float64)
                original_shape = tuple(int(s) for s in image.shape[-3:])
        return {
            "image": data["image"],
            "raw": raw,
            "original_affine": original_affine,
            "original_shape": original_shape,
        }

    def _window_masks(self, window_index: int, length: int) -> torch.Tensor:
        """``(num_masks, L)`` bool masks of one window: cyclic shifts of one seeded permutation."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, 0, window_index))
        order = torch.randperm(length, generator=generator)
        n = num_masked(length, self.mask_ratio)
        masks = torch.zeros(self.num_masks, length, dtype=torch.bool)
        for k in range(self.num_masks):
            start = round(k * length / self.num_masks)
            masks[k, order[(start + torch.arange(n)) % length]] = True
        return masks

    @torch.inference_mode()
    def patch_errors(self, image: torch.Tensor) -> np.ndarray:
        """Per-patch reconstruction error over a whole preprocessed volume.

        Args:
            image: ``(C, H, W, D)`` normalised volume.

        Returns:
            ``(gh, gw, gd)`` float64 errors, ``gh = ceil(H / p0)`` etc., NaN where never masked.
        """
        x = torch.as_tensor(image, dtype=torch.float32).detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        shape = x.shape[1:]
        grid = [-(-s // p) for s, p in zip(shape, self.patch_size)]
        padded = [max(g * p, r) for g, p, r in zip(grid, self.patch_size, self.roi_size)]
        pad_value = x.amin(dim=(1, 2, 3), keepdim=True)
        volume = pad_value.expand(x.shape[0], *padded).clone()
        volume[:, : shape[0], : shape[1], : shape[2]] = x

        window_grid = [r // p for r, p in zip(self.roi_size, self.patch_size)]
        length = int(np.prod(window_grid))
        starts = [window_starts(n, r) for n, r in zip(padded, self.roi_size)]
        windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
        padded_grid = [n // p for n, p in zip(padded, self.patch_size)]
        total = torch.zeros(padded_grid, dtype=torch.float64)
        count = torch.zeros(padded_grid, dtype=torch.float64)
        jobs = [(w, k) for w in range(len(windows)) for k in range(self.num_masks)]
        masks = {}
        for first in range(0, len(jobs), self.batch_size):
            batch = jobs[first : first + self.batch_size]
            crops, batch_masks = [], []
            for w, k in batch:
                if w not in masks:
                    masks = {w: self._window_masks(w, length)}  # windows come in order: keep only the current
                a, b, c = windows[w]
                r0, r1, r2 = self.roi_size
                crops.append(volume[:, a : a + r0, b : b + r1, c : c + r2])
                batch_masks.append(masks[w][k])
            mask = torch.stack(batch_masks).to(self.device)
            errors = masked_patch_errors(
                self.network, torch.stack(crops).to(self.device), mask, self.patch_size, self.teacher_target
            )
            errors, mask = errors.double().cpu(), mask.cpu()
            for (w, _), error, masked in zip(batch, errors, mask):
                o0, o1, o2 = (s // p for s, p in zip(windows[w], self.patch_size))
                region = tuple(slice(o, o + g) for o, g in zip((o0, o1, o2), window_grid))
                total[region] += (error * masked).reshape(window_grid)
                count[region] += masked.double().reshape(window_grid)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (total / count).numpy()
        return mean[: grid[0], : grid[1], : grid[2]]

    def _body_patches(self, raw: np.ndarray) -> np.ndarray:
        """``(gh, gw, gd)`` bool: patches with at least half of their voxels above the body threshold."""
        grid = [-(-s // p) for s, p in zip(raw.shape, self.patch_size)]
        padded = [g * p for g, p in zip(grid, self.patch_size)]
        inside = torch.zeros(1, 1, *padded)
        body = torch.zeros(1, 1, *padded)
        r = torch.from_numpy(raw)
        inside[0, 0, : raw.shape[0], : raw.shape[1], : raw.shape[2]] = 1.0
        body[0, 0, : raw.shape[0], : raw.shape[1], : raw.shape[2]] = (r > BODY_THRESHOLD_HU).float()
        voxels = patchify(inside, self.patch_size).sum(-1)
        fraction = patchify(body, self.patch_size).sum(-1) / voxels.clamp_min(1.0)
        return (fraction >= BODY_PATCH_FRACTION).reshape(grid).numpy()

    def score_file(self, path: str | os.PathLike) -> ScanDifficulty:
        """Difficulty of one scan file or DICOM series folder.

        Raises:
            InvalidScanError: the scan cannot be read or preprocessed; the message names the file.
        """
        import time

        started = time.perf_counter()
        pre = self.preprocess(path)
        image, raw = pre["image"], pre["raw"]
        errors = self.patch_errors(image)
        body = self._body_patches(raw)
        chosen = errors[body & np.isfinite(errors)]
        if chosen.size == 0:
            chosen = errors[np.isfinite(errors)]
        stats = _intensity_stats(raw)
        spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
        extent = [float(n * s) for n, s in zip(raw.shape, spacing)]
        stats.update({f"extent_mm_{axis}": e for axis, e in zip("xyz", extent)})
        flags = intensity_flags(stats, extent, [r * s for r, s in zip(self.roi_size, spacing)])
        affine = np.asarray(image.affine, dtype=np.float64)
        to_patches = np.diag([*self.patch_size, 1.0])
        to_patches[:3, 3] = [(p - 1) / 2 for p in self.patch_size]
        return ScanDifficulty(
            path=os.fspath(path),
            score=float(chosen.mean()) if chosen.size else float("nan"),
            quantile=float(np.quantile(chosen, self.quantile)) if chosen.size else float("nan"),
            patch_errors=errors,
            stats=stats,
            flags=flags,
            patch_size=self.patch_size,
            body_patches=body,
            grid_affine=affine @ to_patches,
            original_affine=pre["original_affine"],
            original_shape=pre["original_shape"],
            preview=raw[:, :, raw.shape[2] // 2].copy(),
            preview_index=raw.shape[2] // 2,
            seconds=time.perf_counter() - started,
        )

    def write_map(self, result: ScanDifficulty, output_file: str | os.PathLike) -> None:
        """Write the per-patch errors as a NIfTI in the scan's original voxel grid (shape and affine of the
        input file), each voxel taking the value of the patch it lies in (nearest patch centre)."""
        from scipy.ndimage import affine_transform

        to_grid = np.linalg.inv(result.grid_affine) @ result.original_affine
        values = np.nan_to_num(result.patch_errors.astype(np.float32), nan=-1.0)
        resampled = affine_transform(
            values,
            to_grid[:3, :3],
            offset=to_grid[:3, 3],
            output_shape=result.original_shape,
            order=0,
            mode="nearest",
        )
        resampled[resampled < 0] = np.nan  # patches never scored
        write_volume(output_file, resampled.astype(np.float32), result.original_affine)
