"""Corrupted copies of real CT: the odd scans of a hospital archive, for benchmarks/difficulty_ranking.py.

Each corruption takes a CT volume in HU (the reader's voxel array, ``(H, W, D)``, ``D`` the slice axis) and
its voxel-to-RAS affine and returns the corrupted array, written with the same affine (only ``flip`` changes
the anatomy's orientation; nothing changes the header):

- ``noise``: additive Gaussian noise, sigma 100 HU (a very low-dose or badly reconstructed series);
- ``streak``: a 12 mm metal ball (3000 HU) inside the body with streaks radiating from it in the slices within
  40 mm, thin bright and dark lines of +-800 HU at the ball decaying over 60 mm (a hip or dental implant's
  artefact);
- ``truncated_fov``: every voxel outside an in-plane circle of radius 30 % of the smaller in-plane extent set
  to air (-1024 HU), cutting the body off (a reconstruction field of view smaller than the patient);
- ``no_rescale``: the stored values without the rescale slope/intercept (HU + 1024, clipped at 0), as a
  reader that ignores the DICOM rescale tags returns them;
- ``flip``: the slice axis reversed, affine kept (head and feet swapped: a wrong slice order).

Usage: ``python benchmarks/corruptions.py SCAN OUT_DIR`` writes ``OUT_DIR/<name>_<corruption>.nii.gz``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anatomask_components.data.readers import read_volume
from anatomask_components.data.writers import write_volume

__all__ = ["CORRUPTIONS", "write_corrupted"]

AIR_HU = -1024.0
BODY_HU = -500.0


def _voxel_size(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def noise(volume: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return volume + rng.normal(0.0, 100.0, volume.shape).astype(np.float32)


def streak(volume: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = _voxel_size(affine)
    body = np.argwhere(volume > BODY_HU)
    # a body voxel half-way between the centre of the body and its edge, so the ball lies inside the body
    centre = body.mean(axis=0)
    candidates = body[np.linalg.norm((body - centre) * size, axis=1) < 40.0]
    ball = candidates[rng.integers(len(candidates))] if len(candidates) else np.round(centre).astype(int)
    grid = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    offset = [(g - b) * s for g, b, s in zip(grid, ball, size)]
    radius_in_plane = np.hypot(offset[0], offset[1])
    angle = np.arctan2(offset[1], offset[0])
    near_slices = np.abs(offset[2]) < 40.0
    wave = np.cos(12 * angle + rng.uniform(0, np.pi))
    # thin streaks: the 8th power keeps the crests narrow, as metal streaks are
    pattern = 800.0 * np.sign(wave) * np.abs(wave) ** 8 * np.exp(-radius_in_plane / 60.0)
    corrupted = volume + np.where(near_slices, pattern, 0.0).astype(np.float32)
    corrupted[np.sqrt(radius_in_plane**2 + offset[2] ** 2) < 6.0] = 3000.0
    return corrupted


def truncated_fov(volume: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = _voxel_size(affine)
    h, w = volume.shape[:2]
    x = (np.arange(h) - (h - 1) / 2) * size[0]
    y = (np.arange(w) - (w - 1) / 2) * size[1]
    radius = 0.3 * min(h * size[0], w * size[1])
    outside = np.hypot(x[:, None], y[None, :]) > radius
    corrupted = volume.copy()
    corrupted[outside] = AIR_HU
    return corrupted


def no_rescale(volume: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(volume - AIR_HU, 0.0, None)


def flip(volume: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(volume[:, :, ::-1])


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": noise,
    "streak": streak,
    "truncated_fov": truncated_fov,
    "no_rescale": no_rescale,
    "flip": flip,
}


def write_corrupted(scan: str | Path, out_dir: str | Path, name: str, seed: int = 0) -> dict[str, Path]:
    """Write every corruption of one scan as ``out_dir/<name>_<corruption>.nii.gz`` (float32, the scan's
    affine); the random ones are seeded by ``seed``.

    Returns:
        corruption -> written file.
    """
    volume, affine, _ = read_volume(scan)
    volume = volume.astype(np.float32)
    written = {}
    for index, (corruption, make) in enumerate(CORRUPTIONS.items()):
        rng = np.random.default_rng([seed, index])
        path = Path(out_dir) / f"{name}_{corruption}.nii.gz"
        written[corruption] = write_volume(path, make(volume, affine, rng).astype(np.float32), affine)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", help="a CT file or DICOM series folder")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name = Path(args.scan.rstrip("/")).name.split(".")[0]
    for corruption, path in write_corrupted(args.scan, args.out_dir, name, args.seed).items():
        print(f"{corruption}: {path}")


if __name__ == "__main__":
    main()
