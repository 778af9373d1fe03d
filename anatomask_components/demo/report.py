"""The demo's figures (PNG) and its report (``report.html``, ``report.md``), from ``results.json``."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomask_components.data.augmentation import NNUNET_AUGMENTATION
from anatomask_components.demo.settings import DemoSettings, clock

__all__ = ["FIGURES", "organs_of_test_case", "write_report"]

FIGURES = {
    "loss_curves": "Loss curves of every run",
    "hard_patches_A": "Case A: what the AnatoMask teacher finds hard",
    "hard_patches_C": "Case C: what the AnatoMask teacher finds hard",
    "topk_shares": "Where the top-k patches lie",
    "dsc_per_organ": "DSC per organ on case C",
    "segmentation_C": "Segmentations of case C",
    "dsc_curve_C": "DSC on case C against fine-tuning iterations",
}
# The demo's target on case C: liver DSC and the mean over these four organs (its issue's acceptance bar).
TARGET_LIVER_DSC = 0.80
TARGET_MEAN_DSC = 0.60
INIT_LABELS = {"scratch": "from scratch", "spark": "SparK encoder", "anatomask": "AnatoMask encoder"}
PRETRAIN_LABELS = {"spark": "SparK (random masking)", "anatomask": "AnatoMask (teacher-guided masking)"}
TARGET_LABELS = {"raw": "raw target (reference)", "normalized": "normalised target"}
HU_WINDOW = (-160.0, 240.0)
PAPER_PRETRAIN_SAMPLES = 1000 * 1204  # the paper's pretraining: 1000 epochs over 1204 TotalSegmentator CT


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _settings(results: dict[str, Any]) -> DemoSettings:
    """The run's settings, with their derived counts (iterations)."""
    return DemoSettings(**results["settings"])


def _inits(results: dict[str, Any]) -> dict[str, str]:
    """The run's fine-tuning initialisations and their labels, in the run's order."""
    return {init: INIT_LABELS[init] for init in _settings(results).finetune_inits}


def _axial(plane: np.ndarray) -> np.ndarray:
    """A RAS (x, y) slice as displayed in radiology: anterior up, the patient's right on the left."""
    return plane.T[::-1, ::-1]


def _label_colormap(num_classes: int):
    from matplotlib.colors import ListedColormap

    colours = [(0, 0, 0, 0)] + [(*c[:3], 1.0) for c in _tab20(num_classes - 1)]
    return ListedColormap(colours)


def _init_colour(init: str) -> tuple[float, ...]:
    """One colour per initialisation, the same in every figure and whichever runs a demo made."""
    return _tab20(2 * len(INIT_LABELS))[2 * list(INIT_LABELS).index(init)]


def _tab20(n: int) -> list[tuple[float, ...]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _stage(results: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in results["stages"] if s["name"] == name)


def _training_log(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    from anatomask_components.handlers import read_training_log

    return read_training_log(_stage(results, name)["outputs"]["training_log"])


def plot_loss_curves(results: dict[str, Any], path: Path) -> Path:
    """Pretraining (masked-patch MSE) and fine-tuning (Dice + CE with deep supervision) loss per iteration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    inits = _inits(results)
    for ax, runs, labels, colours, title, ylabel in (
        (
            axes[0],
            [f"pretrain_{r}" for r in PRETRAIN_LABELS],
            PRETRAIN_LABELS,
            _tab20(6)[::2],
            "Pretraining",
            "masked-patch MSE",
        ),
        (
            axes[1],
            [f"finetune_{i}" for i in inits],
            inits,
            [_init_colour(i) for i in inits],
            "Fine-tuning",
            "Dice + CE",
        ),
    ):
        for run, label, colour in zip(runs, labels.values(), colours):
            log = _training_log(results, run)
            iterations = [e["iteration"] for e in log]
            losses = [e["loss"] for e in log]
            ax.plot(iterations, losses, color=colour, alpha=0.25, linewidth=0.8)
            window = max(1, len(losses) // 15)
            ax.plot(iterations, _moving_average(losses, window), color=colour, linewidth=2, label=label)
        ax.set_title(f"{title} (thin: per iteration, thick: moving average)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hard_patches(figure: dict[str, np.ndarray], case: str, results: dict[str, Any], path: Path) -> Path:
    """The paper's Figures 1 and 3 on a real slice: CT, score maps, both masks, the reconstruction."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    get = {k[len(case) + 1 :]: v for k, v in figure.items() if k.startswith(f"{case}_")}
    hu, image = get["hu"], get["image"]
    # the z-score is affine in HU: map the HU window to the network's scale for the reconstruction panel
    slope, intercept = np.polyfit(hu.ravel(), image.ravel(), 1)
    z_window = [slope * v + intercept for v in HU_WINDOW]
    fig, axes = plt.subplots(2, 3, figsize=(16, 10))
    axes = axes.ravel()

    def background(ax):
        ax.imshow(_axial(hu), cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1])
        ax.set_xticks([])
        ax.set_yticks([])

    background(axes[0])
    axes[0].set_title(f"CT, axial slice {int(get['slice'])} ({HU_WINDOW[0]:.0f}..{HU_WINDOW[1]:.0f} HU)")
    colour_bar = fig.colorbar(axes[0].images[0], ax=axes[0], fraction=0.046)
    colour_bar.set_label("HU")
    score_max = float(np.nanmax([np.nanmax(get["teacher_scores"]), np.nanmax(get["untrained_scores"])]))
    for ax, key, title in (
        (axes[1], "untrained_scores", "untrained network: patch score"),
        (axes[2], "teacher_scores", "AnatoMask teacher: patch score"),
    ):
        background(ax)
        shown = ax.imshow(_axial(get[key]), cmap="magma", alpha=0.85, vmin=0.0, vmax=score_max)
        ax.set_title(f"{title}\n(raw target; masked patches only)")
        fig.colorbar(shown, ax=ax, fraction=0.046).set_label("reconstruction MSE")
    background(axes[3])
    random_mask = np.ma.masked_equal(_axial(get["random_mask"]), 0)
    axes[3].imshow(random_mask, cmap="Blues", vmin=0, vmax=1.2, alpha=0.75)
    axes[3].set_title(f"random mask (SparK), ratio {results['settings']['mask_ratio']}")
    background(axes[4])
    anatomask_mask = np.ma.masked_equal(_axial(get["anatomask_mask"]), 0)
    from matplotlib.colors import ListedColormap

    axes[4].imshow(anatomask_mask, cmap=ListedColormap(["#3b75af", "#d62728"]), vmin=1, vmax=2, alpha=0.75)
    axes[4].set_title(f"AnatoMask mask at r = {results['settings']['hard_ratio_end']}")
    axes[4].legend(
        handles=[
            Patch(color="#d62728", label="chosen by the teacher"),
            Patch(color="#3b75af", label="random"),
        ],
        loc="lower left",
        fontsize=8,
    )
    axes[5].imshow(_axial(get["reconstruction"]), cmap="gray", vmin=z_window[0], vmax=z_window[1])
    axes[5].set_xticks([])
    axes[5].set_yticks([])
    axes[5].set_title("AnatoMask student's reconstruction\n(masked patches predicted)")
    fig.suptitle(
        f"Case {case}: patches are 16^3 voxels of {results['settings']['spacing'][0]:g} mm; "
        "the slice cuts through them\n(radiological view: patient's right on the left)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_topk_shares(analysis: dict[str, Any], path: Path) -> Path:
    """Body and organ share of the top-k patches per scorer and target, against random patches."""
    plt = _pyplot()
    mean = analysis["mean"]
    scorers = list(mean)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    for ax, region in zip(axes, ("body", "organs")):
        width = 0.8 / (len(scorers) + 1)
        for t, target in enumerate(TARGET_LABELS):
            random_share = mean[scorers[0]][target][f"random_{region}"]
            ax.bar(
                t, 100 * random_share, width, color="#999999", label="random k patches" if t == 0 else None
            )
            for s, (scorer, colour) in enumerate(zip(scorers, _tab20(2 * len(scorers))[::2])):
                ax.bar(
                    t + (s + 1) * width,
                    100 * mean[scorer][target][f"topk_{region}"],
                    width,
                    color=colour,
                    label=scorer.replace("_", " ") if t == 0 else None,
                )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(TARGET_LABELS))])
        ax.set_xticklabels(list(TARGET_LABELS.values()))
        ax.set_ylabel(f"% of the chosen patches' volume in {region}")
        ax.set_title(f"Top-k patches inside the {'body' if region == 'body' else 'FLARE22 organs'}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Mean over cases {', '.join(analysis['cases'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def organs_of_test_case(data_dir: str | Path) -> list[int]:
    """The FLARE22 label ids present in case C's reference (the organs the table must have a row for)."""
    import nibabel as nib

    labels = np.asanyarray(nib.load(Path(data_dir) / "labels" / "C_flare22.nii.gz").dataobj)
    return [int(v) for v in np.unique(labels) if v > 0]


def dsc_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"label", "name", <init>: {"dsc", "nsd"}}`` for the organs of case C, then the mean row."""
    summaries = {
        init: json.loads(
            Path(_stage(results, f"evaluate_{init}")["outputs"]["summary"]).read_text(encoding="utf-8")
        )
        for init in _inits(results)
    }
    present = organs_of_test_case(results["data"])
    names = {entry["label"]: name for name, entry in next(iter(summaries.values()))["classes"].items()}
    rows = []
    for label in present:
        name = names[label]
        row = {"label": label, "name": name}
        for init, summary in summaries.items():
            entry = summary["classes"][name]
            row[init] = {m: entry[m]["mean"] for m in ("dsc", "nsd")}
        rows.append(row)
    mean_row = {"label": None, "name": f"mean over these {len(rows)} organs"}
    for init in summaries:
        mean_row[init] = {
            m: float(np.mean([r[init][m] for r in rows if r[init][m] is not None])) for m in ("dsc", "nsd")
        }
    return [*rows, mean_row]


def plot_dsc(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    inits = [init for init in INIT_LABELS if init in rows[0]]
    width = 0.8 / len(inits)
    positions = np.arange(len(rows))
    for i, init in enumerate(inits):
        values = [100 * (r[init]["dsc"] or 0.0) for r in rows]
        offset = (i - (len(inits) - 1) / 2) * width
        ax.bar(positions + offset, values, width, color=_init_colour(init), label=INIT_LABELS[init])
    ax.set_xticks(positions)
    ax.set_xticklabels([r["name"] if r["label"] else "mean" for r in rows], rotation=30, ha="right")
    ax.set_ylabel("DSC (%)")
    ax.set_ylim(0, 100)
    ax.set_title("DSC on case C (agreement with TotalSegmentator's labels), by initialisation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dsc_curve(results: dict[str, Any], path: Path) -> Path:
    """Liver DSC and the four-organ mean on case C per kept checkpoint, one line per initialisation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for init, label in _inits(results).items():
        colour = _init_colour(init)
        points = results["curves"]["runs"].get(init, [])
        iterations = [p["iteration"] for p in points]
        axes[0].plot(iterations, [100 * _nan0(p["dsc"]["liver"]) for p in points], "o-", color=colour)
        axes[1].plot(
            iterations,
            [100 * curve_mean(p["dsc"]) for p in points],
            "o-",
            color=colour,
            label=label,
        )
    for ax, title, target in (
        (axes[0], "liver", TARGET_LIVER_DSC),
        (axes[1], "mean of " + ", ".join(results["curves"]["organs"]), TARGET_MEAN_DSC),
    ):
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"DSC on case C: {title}")
        ax.set_xlabel("fine-tuning iteration")
        ax.set_ylabel("DSC (%), fine-tuning grid")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan0(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)


def curve_mean(dsc: dict[str, float]) -> float:
    """Mean DSC over the curve's organs (an organ missing from the prediction and reference counts 0)."""
    return float(np.mean([_nan0(v) for v in dsc.values()]))


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


def plot_segmentations(results: dict[str, Any], names: dict[int, str], path: Path) -> Path:
    """Reference and predicted label maps of case C on two axial slices, in the series' own geometry."""
    import nibabel as nib

    from anatomask_components.data.readers import read_volume

    plt = _pyplot()
    from matplotlib.patches import Patch

    data = Path(results["data"])
    image, affine, _ = read_volume(data / "images" / "C_ct_dicom")
    ct = _canonical(np.asarray(image, dtype=np.float32), affine)
    reference = nib.load(data / "labels" / "C_flare22.nii.gz")
    maps = {"reference (TotalSegmentator)": _canonical(np.asanyarray(reference.dataobj), reference.affine)}
    for init, label in _inits(results).items():
        prediction = nib.load(_stage(results, f"infer_{init}")["outputs"]["label_maps"][0])
        maps[label] = _canonical(np.asanyarray(prediction.dataobj), prediction.affine)
    for name, volume in maps.items():
        if volume.shape != ct.shape:
            raise ValueError(f"{name}: label map shape {volume.shape} differs from case C's {ct.shape}")
    counts = (maps["reference (TotalSegmentator)"] > 0).sum(axis=(0, 1))
    first = int(np.argmax(counts))
    others = [z for z in np.argsort(counts)[::-1] if abs(int(z) - first) >= ct.shape[2] // 3]
    slices = [first, int(others[0])] if others else [first]
    num_classes = max(names) + 1
    cmap = _label_colormap(num_classes)
    fig, axes = plt.subplots(
        len(slices),
        len(maps) + 1,
        figsize=(4 * (len(maps) + 1), 4.4 * len(slices) + 1.2),
        layout="constrained",
    )
    axes = np.atleast_2d(axes)
    for row, z in enumerate(slices):
        axes[row, 0].imshow(_axial(ct[:, :, z]), cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1])
        axes[row, 0].set_ylabel(f"slice {z} of {ct.shape[2]}")
        if row == 0:
            axes[row, 0].set_title("case C (CT)")
        for col, (name, volume) in enumerate(maps.items(), start=1):
            ax = axes[row, col]
            ax.imshow(_axial(ct[:, :, z]), cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1])
            ax.imshow(
                _axial(volume[:, :, z]),
                cmap=cmap,
                vmin=0,
                vmax=num_classes - 1,
                alpha=0.55,
                interpolation="nearest",
            )
            if row == 0:  # one title per column: titles of lower rows would cross the images above
                ax.set_title(name)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    present = sorted({int(v) for volume in maps.values() for v in np.unique(volume) if v > 0})
    fig.legend(
        handles=[Patch(color=cmap(label), label=names.get(label, str(label))) for label in present],
        loc="outside lower center",
        ncol=min(7, len(present)),
        fontsize=9,
    )
    fig.suptitle("Case C (20-slice DICOM series, never seen in fine-tuning): label maps in its own geometry")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _augmentation_text(settings: Mapping[str, Any]) -> str:
    """The fine-tuning augmentation of a run's settings, in words."""
    off = [key.removesuffix("_prob").replace("_", " ") for key in settings.get("augmentation_off", ())]
    low, high = settings.get("enhance_range", NNUNET_AUGMENTATION["enhance_range"])
    return (
        "nnU-Net's defaults"
        + (f' except {", ".join(off)} (off: docs/finetune.md, "The demo\'s recipe")' if off else "")
        + f", crops past the border, thin-slab crops; simulated contrast enhancement with p = "
        f"{settings.get('enhance_prob', NNUNET_AUGMENTATION['enhance_prob'])}, offsets {low:g} .. {high:g} normalised units per organ"
    )


def _normalisation_text(settings: Mapping[str, Any]) -> str:
    """The CT normalisation of a run's settings, in words."""
    window = settings.get("ct_window")
    if window is None:
        return "nnU-Net's CT scheme with the pretraining set's fingerprint, every run"
    return (
        f"nnU-Net's CT scheme with a fixed window: clip to {window[0]:g} .. {window[1]:g} HU, map to -2 .. 2, "
        'the same for pretraining and fine-tuning (docs/finetune.md, "The demo\'s recipe")'
    )


def _teacher_init_weight(settings: dict[str, Any]) -> float:
    """Weight of the random initialisation left in the EMA teacher at the end of pretraining."""
    epochs = settings["pretrain_epochs"]
    start, end = settings["ema_momentum"]
    warmup = 0.25 * epochs
    weight = 1.0
    for epoch in range(epochs):
        momentum = start + min(epoch / warmup, 1.0) * (end - start) if warmup > 0 else end
        weight *= momentum**3  # 3 iterations per epoch
    return weight


def _pct(value: float | None) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
    )


def best_validation_dice(results: dict[str, Any], init: str) -> float | None:
    """The best validation mean DSC on case A of a fine-tuning run (BestModelSaver's state in its newest
    checkpoint), or None if the run wrote no checkpoint."""
    import torch

    from anatomask_components.checkpointing import latest_checkpoint

    folder = Path(_stage(results, f"finetune_{init}")["folder"])
    path = latest_checkpoint(folder / "runs" / "checkpoints")
    if path is None:
        return None
    best = torch.load(path, map_location="cpu", weights_only=True)["best_model"]["best"]
    return None if best is None else float(best)


def _median_step(results: dict[str, Any], name: str) -> float | None:
    if "training_log" not in _stage(results, name)["outputs"]:
        return None
    log = _training_log(results, name)
    return float(np.median([e["seconds"] for e in log[1:] or log]))


def _tables(
    results: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every table of the report as (header, rows) of strings."""
    settings = results["settings"]
    inits = _inits(results)
    env = results["environment"]
    iterations = {
        "pretrain": _settings(results).pretrain_iterations,
        "finetune": _settings(results).finetune_iterations,
    }
    settings_rows = [
        ["seed", str(results["seed"]), "every run"],
        [
            "device",
            f"{env['device']}, torch {env['torch']} ({env['torch_threads']} threads), MONAI {env['monai']}",
            "",
        ],
        [
            "network",
            f"STU-Net, widths {settings['dims']}, {settings['depths'][0]} block per stage",
            "paper: STU-Net-B (32..512)",
        ],
        ["voxel spacing", f"{settings['spacing'][0]:g} mm isotropic", "paper: 1.5 mm"],
        ["crop (= sliding window)", " x ".join(map(str, settings["roi_size"])), "paper: 112 x 112 x 128"],
        [
            "mask unit, mask ratio, r_T",
            f"16^3, {settings['mask_ratio']}, {settings['hard_ratio_end']}",
            "as the paper",
        ],
        [
            "pretraining",
            f"{iterations['pretrain']} iterations ({settings['pretrain_epochs']} epochs of 3 CT), batch 1, AdamW lr {settings['pretrain_lr']:g}",
            "paper: 1000 epochs of 1204 CT, batch 4",
        ],
        [
            "teacher EMA momentum",
            f"{settings['ema_momentum'][0]} -> {settings['ema_momentum'][1]} over the first quarter",
            f"paper: 0.999 -> 0.9999; with these steps the teacher keeps {100 * _teacher_init_weight(settings):.0f} % of its initialisation",
        ],
        [
            "fine-tuning",
            f"{iterations['finetune']} iterations on case A{' and case B (aorta only; its other organs out of the loss)' if settings.get('partial_case_b') else ''} (1 crop per step), AdamW lr {settings['finetune_lr']:g}, validation on A every {settings['val_interval']} epochs of {settings['iterations_per_epoch']}; runs: {', '.join(inits.values())}",
            "paper: 1000 epochs x 250 iterations, lr 1e-4, 50 labelled scans",
        ],
        [
            "augmentation",
            _augmentation_text(settings),
            "reference: nnU-Net's defaults (all of them on)",
        ],
        [
            "CT normalisation",
            _normalisation_text(settings),
            "reference: nnU-Net's CT scheme with the dataset's fingerprint (the bundles' default)",
        ],
        ["sliding-window overlap", str(settings["sw_overlap"]), "bundle default"],
    ]
    stage_rows = []
    for stage in results["stages"]:
        step = _median_step(results, stage["name"])
        stage_rows.append(
            [
                stage["name"],
                clock(stage["wall_s"]),
                f"{step:.2f}" if step is not None else "",
                f"{stage['peak_rss_mb']:.0f}",
                _peak_gpu(stage),
            ]
        )
    stage_rows.append(["analysis (in the demo process)", clock(results["analysis"]["seconds"]), "", "", ""])
    if "curves" in results:
        stage_rows.append(["curve (in the demo process)", clock(results["curves"]["seconds"]), "", "", ""])
    transfer_rows = []
    for init in inits:
        path = Path(_stage(results, f"finetune_{init}")["outputs"]["weight_transfer"])
        report = json.loads(path.read_text(encoding="utf-8"))
        if report["source"] is None:
            transfer_rows.append(
                [INIT_LABELS[init], "none (random initialisation)", "0", str(report["num_network_tensors"])]
                + [_pct(best_validation_dice(results, init))]
            )
        else:
            transfer_rows.append(
                [
                    INIT_LABELS[init],
                    Path(report["source"]).parent.parent.name + "/models/encoder.pt",
                    f"{report['num_transferred']} of {report['num_network_tensors']}",
                    str(report["num_initial"]),
                    _pct(best_validation_dice(results, init)),
                ]
            )
    analysis = results["analysis"]
    topk_rows = []
    for target, target_label in TARGET_LABELS.items():
        first = next(iter(analysis["mean"].values()))[target]
        topk_rows.append(
            [
                target_label,
                "random k patches",
                _pct(first["random_body"]),
                _pct(first["random_organs"]),
                "1.00",
            ]
        )
        for scorer, values in analysis["mean"].items():
            entry = values[target]
            ratio = entry["topk_organs"] / first["random_organs"] if first["random_organs"] else math.nan
            topk_rows.append(
                [
                    target_label,
                    analysis["scorers"][scorer],
                    _pct(entry["topk_body"]),
                    _pct(entry["topk_organs"]),
                    f"{ratio:.2f}",
                ]
            )
    dsc_rows = [[r["name"], *[f"{_pct(r[i]['dsc'])} / {_pct(r[i]['nsd'])}" for i in inits]] for r in rows]
    slab_rows = [
        [
            INIT_LABELS[init],
            ", ".join(f"{name} {_pct(v)}" for name, v in entry["whole"].items()),
            "; ".join(
                f"slice {slab['start']}: "
                + (", ".join(f"{name} {_pct(v)}" for name, v in slab["agreement"].items()) or "no organ")
                for slab in entry["slabs"]
            ),
        ]
        for init, entry in results.get("slabs", {}).get("runs", {}).items()
    ]
    return {
        "slabs": (
            [
                "fine-tuning initialisation",
                "whole scan of A: DSC vs reference (%)",
                "slabs of A alone: DSC vs the whole-scan label map on the same slices (%)",
            ],
            slab_rows,
        ),
        "settings": (["setting", "this demo", "the paper / note"], settings_rows),
        "stages": (
            ["stage", "wall time (m:s)", "median s / iteration", "peak RSS (MB)", "peak GPU (MB)"],
            stage_rows,
        ),
        "transfer": (
            [
                "fine-tuning initialisation",
                "weights",
                "tensors loaded",
                "left at initial values",
                "best validation mean DSC on case A (%)",
            ],
            transfer_rows,
        ),
        "topk": (
            ["teacher target", "scorer", "% in body", "% in FLARE22 organs", "organs vs random"],
            topk_rows,
        ),
        "dsc": (
            ["organ (FLARE22 id in case C)", *[f"{v}: DSC / NSD (%)" for v in inits.values()]],
            dsc_rows,
        ),
    }


def _peak_gpu(stage: dict[str, Any]) -> str:
    if "training_log" not in stage["outputs"]:
        return ""
    from anatomask_components.handlers import read_training_log

    log = read_training_log(stage["outputs"]["training_log"])
    return f"{log[-1]['peak_gpu_mb']:.0f}" if log and "peak_gpu_mb" in log[-1] else ""


def _findings(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences about what this run's numbers show, computed from them (no claim beyond the table)."""
    mean = results["analysis"]["mean"]
    lines = []
    for target in TARGET_LABELS:
        random_organs = mean["untrained"][target]["random_organs"]
        untrained = mean["untrained"][target]["topk_organs"]
        teacher = mean["anatomask_teacher"][target]["topk_organs"]
        lines.append(
            f"With the {TARGET_LABELS[target]}, {_pct(untrained)} % of the untrained network's top-k volume lies in "
            f"FLARE22 organs and {_pct(teacher)} % of the AnatoMask teacher's, against {_pct(random_organs)} % "
            f"for random patches: the teacher's choice differs from the untrained network's by "
            f"{100 * (teacher - untrained):+.1f} points, which is what pretraining changed."
        )
    mean_row = rows[-1]
    dsc = {init: mean_row[init]["dsc"] for init in _inits(results)}
    best = max(dsc, key=lambda k: dsc[k])
    lines.append(
        "Mean DSC on case C over its organs: "
        + ", ".join(f"{INIT_LABELS[i]} {_pct(v)} %" for i, v in dsc.items())
        + f" (highest: {INIT_LABELS[best]}). One seed ({results['seed']}) and one test case: this run measured "
        f"no seed-to-seed spread, so differences between the {len(dsc)} columns are not evidence that one "
        "initialisation is better."
    )
    lines += _target_findings(results, rows)
    return lines


def _target_findings(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Whether the run reached the demo's target on case C, and what the curve says about more iterations."""
    by_name = {r["name"]: r for r in rows if r["label"] is not None}
    organs = [o for o in ("liver", "spleen", "stomach", "aorta") if o in by_name]
    if "liver" not in by_name:
        return []
    scores = {
        init: (
            by_name["liver"][init]["dsc"] or 0.0,
            float(np.mean([by_name[o][init]["dsc"] or 0.0 for o in organs])),
        )
        for init in _inits(results)
    }
    best = max(scores, key=lambda i: scores[i][1])
    liver, mean = scores[best]
    reached = liver >= TARGET_LIVER_DSC and mean >= TARGET_MEAN_DSC
    lines = [
        f"Best initialisation on case C by the mean over {', '.join(organs)}: {INIT_LABELS[best]}, liver "
        f"{_pct(liver)} %, mean {_pct(mean)} % (target: liver {_pct(TARGET_LIVER_DSC)} %, mean "
        f"{_pct(TARGET_MEAN_DSC)} %): {'reached' if reached else 'not reached'}. Per initialisation: "
        + "; ".join(f"{INIT_LABELS[i]} liver {_pct(a)} %, mean {_pct(b)} %" for i, (a, b) in scores.items())
        + "."
    ]
    curve = results.get("curves", {}).get("runs", {}).get(best, [])
    if len(curve) >= 3:
        means = [curve_mean(p["dsc"]) for p in curve]
        last_third = means[-max(1, len(means) // 3) :]
        rising = means[-1] - means[len(means) // 2] > 0.05
        lines.append(
            f"On the curve of {INIT_LABELS[best]}, the four-organ mean on case C went from {_pct(means[0])} % at "
            f"iteration {curve[0]['iteration']} to {_pct(means[-1])} % at {curve[-1]['iteration']} (last third "
            f"{_pct(min(last_third))}-{_pct(max(last_third))} %): "
            + (
                "still rising over the second half, so more fine-tuning iterations would help."
                if rising
                else "flat over the second half, so more iterations of the same recipe would not help much."
            )
        )
    organ_hu = results.get("curves", {}).get("organ_hu")
    if organ_hu:
        lines.append(
            "What limits the result, measured: one fully labelled training case (A), non-contrast, against a "
            "contrast-enhanced test case (C)"
            + (
                " (case B, a CT angiography, adds only its aorta, at arterial-phase contrast)"
                if _settings(results).partial_case_b
                else ""
            )
            + "; median HU of the organs in A / C: "
            + ", ".join(
                f"{o} {organ_hu['A'].get(o, float('nan')):.0f} / {organ_hu['C'].get(o, float('nan')):.0f}"
                for o in organs
            )
            + ". The labels are TotalSegmentator's predictions, and the run used one seed."
        )
    return lines


def _scale_note(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    return [
        "The paper pretrains STU-Net-B to -H for 1000 epochs on 1204 TotalSegmentator CT scans (about 300,000 "
        "iterations at batch 4) on A100 GPUs, then fine-tunes for 1000 epochs on full challenge training sets "
        "(FLARE22: 50 labelled scans); it reports FLARE22 DSC of 93.8 % (SparK) and 94.0 % (AnatoMask) for "
        "STU-Net-B. Those are the paper's numbers, not ours.",
        f"This demo pretrains a small STU-Net for {_settings(results).pretrain_iterations} iterations at batch 1 on 3 CT "
        f"scans, {100 * _settings(results).pretrain_iterations / PAPER_PRETRAIN_SAMPLES:.3f} % of the paper's "
        f"{PAPER_PRETRAIN_SAMPLES:,} pretraining samples (1000 epochs x 1204 scans), each a "
        f"{'x'.join(map(str, settings['roi_size']))} crop through a network of a few million parameters instead of "
        f"112x112x128 through STU-Net-B; it fine-tunes for {_settings(results).finetune_iterations} "
        f"iterations on one scan{' (and the aorta of a second)' if _settings(results).partial_case_b else ''} whose "
        "labels are TotalSegmentator's predictions (not manual labels; FLARE22 has "
        "50 labelled scans) and tests on one 20-slice series, on the CPU in minutes. The table therefore shows "
        "that the pipeline works end to end on real CT and what each stage produces, not the effect the paper "
        "reports.",
        "Pretraining saw case C's image (never its labels), as a user pretraining on all their unlabelled "
        "scans would; the teacher-EMA momentum is scaled down (see the settings) because the paper's would "
        "leave the teacher at its random initialisation after a few hundred steps.",
    ]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _commands(results: dict[str, Any]) -> list[str]:
    return [
        f"cd {Path(results['output']).name}/pretrain_anatomask && python -m monai.bundle run --config_file "
        "\"['configs/train.json','configs/demo_override.json']\"",
        f"cd {Path(results['output']).name}/finetune_anatomask && python -m monai.bundle run --config_file "
        "configs/inference.json --dataset_dir /path/to/your/ct",
    ]


def write_report(output: str | Path, results: dict[str, Any]) -> Path:
    """Draw every figure into ``<output>/figures`` and write ``report.html`` and ``report.md``.

    Returns:
        the path of ``report.html``.
    """
    output = Path(output)
    figures_dir = output / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    with np.load(results["analysis"]["figure_data"]) as data:
        figure = {k: data[k] for k in data.files}
    rows = dsc_table(results)
    names = {r["label"]: r["name"] for r in rows if r["label"] is not None}
    summary = json.loads(
        Path(_stage(results, "evaluate_scratch")["outputs"]["summary"]).read_text(encoding="utf-8")
    )
    all_names = {entry["label"]: name for name, entry in summary["classes"].items()}
    paths = {
        "loss_curves": plot_loss_curves(results, figures_dir / "loss_curves.png"),
        "hard_patches_A": plot_hard_patches(figure, "A", results, figures_dir / "hard_patches_A.png"),
        "hard_patches_C": plot_hard_patches(figure, "C", results, figures_dir / "hard_patches_C.png"),
        "topk_shares": plot_topk_shares(results["analysis"], figures_dir / "topk_shares.png"),
        "dsc_per_organ": plot_dsc(rows, figures_dir / "dsc_per_organ.png"),
        "segmentation_C": plot_segmentations(
            results, {**all_names, **names}, figures_dir / "segmentation_C.png"
        ),
        **(
            {"dsc_curve_C": plot_dsc_curve(results, figures_dir / "dsc_curve_C.png")}
            if "curves" in results
            else {}
        ),
    }
    tables = _tables(results, rows)
    mode = "quick" if results["settings"]["quick"] else "full"
    total = results["total_seconds_before_report"]
    sections: list[tuple[str, list[tuple[str, Any]]]] = [
        (
            "What ran",
            [
                (
                    "p",
                    f"The {mode} demo, seed {results['seed']}, {clock(total)} (m:s) before this report, on "
                    f"{results['environment']['device']}. Every stage below is a copy of a bundle of this repository "
                    "run with `python -m monai.bundle run` and the override `configs/demo_override.json`; each folder "
                    "runs again on its own, e.g.:",
                ),
                ("code", "\n".join(_commands(results))),
                ("table", tables["settings"]),
                ("table", tables["stages"]),
            ],
        ),
        (
            "How far this is from the paper",
            [("p", text) for text in _scale_note(results)],
        ),
        (
            "Loss curves",
            [("figure", "loss_curves")],
        ),
        (
            "What the teacher finds hard",
            [
                (
                    "p",
                    "In the manner of the paper's Figures 1 and 3, on real slices. Score maps show each masked "
                    "patch's reconstruction error (visible patches are not scored); the AnatoMask mask takes the "
                    "k highest-scoring patches (red) and fills the rest at random (blue).",
                ),
                ("figure", "hard_patches_A"),
                ("figure", "hard_patches_C"),
                (
                    "p",
                    f"Share of the top-k patches' volume inside the body (CT > {results['analysis']['body_hu']:.0f} "
                    f"HU) and inside FLARE22 organs, mean over cases {', '.join(results['analysis']['cases'])} and "
                    f"{results['settings']['analysis_masks']} random masks per case (k = floor(n_masked x r_T)). "
                    "With the raw target the score of a patch grows with its own intensity energy, so the untrained "
                    "network already prefers some patches; the difference between the untrained row and the "
                    "teachers is what pretraining learned.",
                ),
                ("table", tables["topk"]),
                ("figure", "topk_shares"),
            ],
        ),
        (
            "Fine-tuning: weights loaded",
            [("table", tables["transfer"])],
        ),
        (
            "Segmentation of case C",
            [
                (
                    "p",
                    "Mean over the one test case (case C, a DICOM series of another scanner, resolution and "
                    "format). Rows: the FLARE22 organs present in case C's reference. DSC and NSD (1 mm tolerance) "
                    "in %, measured against TotalSegmentator's labels, so they report agreement with "
                    "TotalSegmentator.",
                ),
                ("table", tables["dsc"]),
                ("figure", "dsc_per_organ"),
                ("figure", "segmentation_C"),
                *(
                    [
                        (
                            "p",
                            "Every kept fine-tuning checkpoint segmenting case C as the bundle's inference does, "
                            "scored on the fine-tuning grid (the table above scores the final model in the "
                            "series' own geometry). Dashed: the demo's targets (liver 80 %, four-organ mean 60 %).",
                        ),
                        ("figure", "dsc_curve_C"),
                    ]
                    if "dsc_curve_C" in paths
                    else []
                ),
                *(
                    [
                        (
                            "p",
                            "Thin scans: each run's model labels slabs of case A as thick as case C "
                            f"({results['slabs']['thickness_mm']:g} mm) on their own, "
                            "padded as inference pads them, and its label map of the whole scan of A on the same "
                            "slices is the reference (organs with at least 50 voxels there). Agreement near "
                            "100 % means a thin scan is segmented as the same anatomy inside a whole scan would "
                            "be; it is only worth as much as the whole-scan fit next to it.",
                        ),
                        ("table", tables["slabs"]),
                    ]
                    if results.get("slabs")
                    else []
                ),
            ],
        ),
        ("Findings of this run", [("p", text) for text in _findings(results, rows)]),
    ]
    (output / "report.html").write_text(_render_html(sections, paths, output), encoding="utf-8")
    (output / "report.md").write_text(_render_markdown(sections, paths, output), encoding="utf-8")
    return output / "report.html"


def _render_html(sections, paths: dict[str, Path], output: Path) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>AnatoMask demo report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.45;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}figcaption{color:#555;font-size:0.9em}"
        "</style></head><body><h1>AnatoMask demo report</h1>"
    ]
    for title, blocks in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for kind, content in blocks:
            if kind == "p":
                parts.append(f"<p>{html.escape(content)}</p>")
            elif kind == "code":
                parts.append(f"<pre>{html.escape(content)}</pre>")
            elif kind == "table":
                parts.append(_html_table(*content))
            elif kind == "figure":
                source = paths[content].relative_to(output).as_posix()
                parts.append(
                    f"<figure><img src='{source}' alt='{html.escape(FIGURES[content])}'>"
                    f"<figcaption>{html.escape(FIGURES[content])}</figcaption></figure>"
                )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _render_markdown(sections, paths: dict[str, Path], output: Path) -> str:
    parts = ["# AnatoMask demo report"]
    for title, blocks in sections:
        parts.append(f"## {title}")
        for kind, content in blocks:
            if kind == "p":
                parts.append(content)
            elif kind == "code":
                parts.append(f"```bash\n{content}\n```")
            elif kind == "table":
                parts.append(_md_table(*content))
            elif kind == "figure":
                parts.append(f"![{FIGURES[content]}]({paths[content].relative_to(output).as_posix()})")
    return "\n\n".join(parts) + "\n"
