"""``anatomask rank-scans``: rank a folder of scans by reconstruction difficulty, most difficult first.

For every scan of a folder (or of a datalist's sections) it runs :class:`~anatomask_components.difficulty.
DifficultyScorer` and writes under ``out``:

- ``ranking.csv``: one row per scan, most difficult first (rank, scan, score, quantile, intensity statistics,
  flags, the map file), then one row per unreadable scan with the reader's error in ``error``;
- ``ranking.html``: a self-contained report (PNG images inlined as base64): a histogram of the scores, per
  scan an axial thumbnail and the same slice with the per-patch difficulty overlaid (one colour scale for
  all scans), and the table of unreadable scans. It needs matplotlib (the ``demo`` extra);
- ``maps/<scan>_difficulty.nii.gz``: the per-patch error map in the scan's original voxel grid.

A scan that cannot be read or preprocessed does not stop the run: it is listed with its error.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomask_components.data.checks import datalist_items, load_datalist
from anatomask_components.data.datalists import find_scans
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.difficulty import DifficultyScorer, ScanDifficulty
from anatomask_components.files import atomic_write_text

__all__ = ["list_scans", "rank_scans", "write_csv", "write_html"]

STAT_COLUMNS = ("hu_mean", "hu_std", "hu_p1", "hu_p50", "hu_p99", "body_fraction")
CSV_COLUMNS = ("rank", "scan", "score", "quantile", *STAT_COLUMNS, "seconds", "flags", "map", "error")
DATALIST_SECTIONS = ("training", "validation", "test")
# soft-tissue window of the thumbnails, HU
THUMBNAIL_WINDOW = (-160.0, 240.0)


def list_scans(dataset: str | os.PathLike) -> list[str]:
    """The scans to rank: every scan under a folder (recursive; DICOM series folders count as one), or the
    images of a datalist JSON's training, validation and test sections (relative paths are taken from the
    datalist's folder), each once.

    Raises:
        InvalidScanError: the folder does not exist or holds no scans.
        ValueError, KeyError: the datalist is malformed.
    """
    dataset = Path(dataset)
    if dataset.is_file() and dataset.suffix.lower() == ".json":
        content, name = load_datalist(dataset)
        scans = []
        for _, _, item in datalist_items(content, DATALIST_SECTIONS, name=name):
            image = item["image"]
            if not isinstance(image, str):
                raise ValueError(f"{name}: rank-scans takes one image file per item, got {image!r}")
            path = Path(image) if Path(image).is_absolute() else dataset.parent / image
            scans.append(os.fspath(path))
        if not scans:
            raise InvalidScanError(dataset, f"no items in the sections {', '.join(DATALIST_SECTIONS)}")
        return list(dict.fromkeys(scans))
    scans, _ = find_scans(dataset)
    if not scans:
        raise InvalidScanError(dataset, "no scans found")
    return scans


def _map_name(scan: str, used: set[str]) -> str:
    base = Path(scan.rstrip("/\\")).name
    base = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd|\.dcm)$", "", base, flags=re.IGNORECASE)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "scan"
    name, n = f"{base}_difficulty.nii.gz", 1
    while name in used:
        n += 1
        name = f"{base}_{n}_difficulty.nii.gz"
    used.add(name)
    return name


def _progress(done: int, total: int, started: float, label: str) -> None:
    """One self-overwriting progress line on stderr: bar, count, elapsed and remaining time."""
    width = 30
    filled = width * done // max(total, 1)
    elapsed = time.perf_counter() - started
    left = elapsed / done * (total - done) if done else float("nan")
    remaining = f", ~{left:.0f} s left" if done and done < total else ""
    end = "\n" if done == total else ""
    print(
        f"\r[rank-scans] [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f} s{remaining} "
        f"{label[-40:]:<40}",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _sort_key(result: ScanDifficulty) -> tuple[bool, float]:
    return (math.isnan(result.score), -result.score if not math.isnan(result.score) else 0.0)


def _rounded(value: float, digits: int = 6) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else round(float(value), digits)


def write_csv(
    path: str | os.PathLike,
    results: Sequence[ScanDifficulty],
    errors: Sequence[tuple[str, str]],
    maps: dict[str, str] | None = None,
) -> Path:
    """``ranking.csv``: ranked scans (``results`` in rank order), then unreadable ones with their error."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for rank, result in enumerate(results, start=1):
        writer.writerow(
            {
                "rank": rank,
                "scan": result.path,
                "score": _rounded(result.score),
                "quantile": _rounded(result.quantile),
                **{key: _rounded(result.stats[key], 4) for key in STAT_COLUMNS},
                "seconds": round(result.seconds, 2),
                "flags": "; ".join(result.flags),
                "map": (maps or {}).get(result.path, ""),
                "error": "",
            }
        )
    for scan, message in errors:
        writer.writerow({"scan": scan, "error": message})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError(
            "ranking.html needs matplotlib, which is not installed: pip install matplotlib "
            "(ranking.csv and the maps are written)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight", pad_inches=0.02)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _axial(plane: np.ndarray) -> np.ndarray:
    """A RAS (x, y) slice as displayed in radiology: anterior up, the patient's right on the left."""
    return plane.T[::-1, ::-1]


def _overlay_plane(result: ScanDifficulty) -> np.ndarray:
    """The patch errors of the preview slice, one value per voxel, ``(H, W)``."""
    p0, p1, p2 = result.patch_size
    row = result.patch_errors[:, :, result.preview_index // p2]
    voxels = np.repeat(np.repeat(row, p0, axis=0), p1, axis=1)
    return voxels[: result.preview.shape[0], : result.preview.shape[1]]


def _thumbnails(plt, result: ScanDifficulty, vmax: float) -> tuple[str, str]:
    """Base64 PNGs of the preview slice and of the slice with the difficulty overlay."""
    plane = _axial(result.preview)
    pictures = []
    for overlay in (False, True):
        figure, axis = plt.subplots(figsize=(2.2, 2.2 * plane.shape[0] / max(plane.shape[1], 1)))
        axis.imshow(plane, cmap="gray", vmin=THUMBNAIL_WINDOW[0], vmax=THUMBNAIL_WINDOW[1])
        if overlay:
            axis.imshow(_axial(_overlay_plane(result)), cmap="inferno", vmin=0.0, vmax=vmax, alpha=0.55)
        axis.set_axis_off()
        pictures.append(_png(figure))
        plt.close(figure)
    return pictures[0], pictures[1]


def _histogram(plt, scores: Sequence[float]) -> str:
    figure, axis = plt.subplots(figsize=(6.0, 2.6))
    axis.hist(scores, bins=max(5, min(40, len(scores))), color="#b5472f")
    axis.set_xlabel("difficulty score (mean per-patch error inside the body)")
    axis.set_ylabel("scans")
    figure.tight_layout()
    picture = _png(figure)
    plt.close(figure)
    return picture


def write_html(
    path: str | os.PathLike,
    results: Sequence[ScanDifficulty],
    errors: Sequence[tuple[str, str]],
    about: dict[str, Any],
) -> Path:
    """``ranking.html``: histogram, one row per scan in rank order with thumbnail and overlay, bad scans.

    Args:
        path: the file to write.
        results: scored scans, most difficult first.
        errors: ``(scan, error)`` of the scans that could not be scored.
        about: lines of the header (bundle, weights, settings), shown as given.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    plt = _pyplot()
    finite = [r.patch_errors[np.isfinite(r.patch_errors)] for r in results]
    pooled = np.concatenate(finite) if finite else np.zeros(0)
    vmax = float(np.quantile(pooled, 0.99)) if pooled.size else 1.0
    scores = [r.score for r in results if not math.isnan(r.score)]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Scan difficulty ranking</title><style>",
        "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}",
        "th{background:#eee}.flag{color:#a40}.err{color:#b00;font-family:monospace}</style></head><body>",
        "<h1>Scan difficulty ranking</h1>",
        "<p>Most difficult first. Score: mean reconstruction error of the patches inside the body (the "
        "network masks each patch several times and reconstructs it from its surroundings); quantile: the "
        "high quantile of the same errors. Overlay: per-patch error on the middle axial slice, one colour "
        f"scale for all scans (0 to {vmax:.3g}, the 99th percentile of all patch errors).</p><ul>",
        *(f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in about.items()),
        "</ul>",
    ]
    if scores:
        histogram = _histogram(plt, scores)
        parts.append(f"<h2>Scores</h2><img alt='score histogram' src='data:image/png;base64,{histogram}'>")
    parts.append(
        "<h2>Scans</h2><table><tr><th>rank</th><th>scan</th><th>score</th><th>quantile</th><th>HU mean / std"
        "</th><th>HU p1 / p50 / p99</th><th>body</th><th>flags</th><th>slice</th><th>difficulty</th></tr>"
    )
    for rank, result in enumerate(results, start=1):
        picture, overlay = _thumbnails(plt, result, vmax)
        s = result.stats
        flags = "<br>".join(f"<span class='flag'>{esc(f)}</span>" for f in result.flags)
        parts.append(
            f"<tr><td>{rank}</td><td>{esc(result.path)}</td><td>{result.score:.4g}</td>"
            f"<td>{result.quantile:.4g}</td><td>{s['hu_mean']:.0f} / {s['hu_std']:.0f}</td>"
            f"<td>{s['hu_p1']:.0f} / {s['hu_p50']:.0f} / {s['hu_p99']:.0f}</td>"
            f"<td>{100 * s['body_fraction']:.0f} %</td><td>{flags}</td>"
            f"<td><img alt='slice' src='data:image/png;base64,{picture}'></td>"
            f"<td><img alt='difficulty overlay' src='data:image/png;base64,{overlay}'></td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<h2>Scans that could not be scored ({len(errors)})</h2>")
    if errors:
        parts.append("<table><tr><th>scan</th><th>error</th></tr>")
        parts += [
            f"<tr><td>{esc(scan)}</td><td class='err'>{esc(message)}</td></tr>" for scan, message in errors
        ]
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)


def rank_scans(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    weights: str = "teacher",
    num_masks: int = 4,
    seed: int = 0,
    batch_size: int = 2,
    device: str | None = None,
    maps: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every scan, write ``ranking.csv``, ``ranking.html`` and the maps under ``out``.

    Args:
        bundle: the pretraining bundle folder (see :class:`DifficultyScorer`).
        dataset_dir: a folder of scans or a datalist JSON.
        out: output folder (created).
        weights, num_masks, seed, batch_size, device: see :class:`DifficultyScorer`.
        maps: write the per-scan NIfTI maps.
        progress: draw a progress bar on stderr.

    Returns:
        ``{"ranked": [ScanDifficulty, ...] most difficult first, "errors": [(scan, error), ...], "csv": path,
        "html": path, "seconds_per_scan": mean seconds of the scored scans}``.
    """
    out = Path(out)
    scans = list_scans(dataset_dir)
    scorer = DifficultyScorer(bundle, weights, num_masks, seed, batch_size, device)
    results: list[ScanDifficulty] = []
    errors: list[tuple[str, str]] = []
    map_files: dict[str, str] = {}
    used: set[str] = set()
    started = time.perf_counter()
    for done, scan in enumerate(scans):
        if progress:
            _progress(done, len(scans), started, scan)
        try:
            result = scorer.score_file(scan)
        except InvalidScanError as error:
            errors.append((scan, str(error)))
            continue
        results.append(result)
        if maps:
            target = out / "maps" / _map_name(scan, used)
            scorer.write_map(result, target)
            map_files[scan] = os.fspath(target.relative_to(out))
    if progress:
        _progress(len(scans), len(scans), started, "done")
    results.sort(key=_sort_key)
    csv_path = write_csv(out / "ranking.csv", results, errors, map_files)
    seconds = float(np.mean([r.seconds for r in results])) if results else float("nan")
    about = {
        "bundle": os.fspath(bundle),
        "weights": f"{scorer.weights_source} (sha256 {scorer.model_digest[:16]})",
        "settings": f"{scorer.num_masks} masks per window at ratio {scorer.mask_ratio}, seed {scorer.seed}, "
        f"window {list(scorer.roi_size)} voxels, mask unit {list(scorer.patch_size)}, target "
        f"{scorer.teacher_target}, device {scorer.device}",
        "scans": f"{len(results)} scored, {len(errors)} could not be scored, {seconds:.1f} s per scan",
    }
    html_path = write_html(out / "ranking.html", results, errors, about)
    return {
        "ranked": results,
        "errors": errors,
        "csv": csv_path,
        "html": html_path,
        "seconds_per_scan": seconds,
    }
