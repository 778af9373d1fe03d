"""The demo's stages: fetch real CT, pretrain twice, fine-tune three times (quick: twice), evaluate, infer.

Each stage copies a bundle of this repository into ``<output>/<run>/`` (configs, docs, licence), writes the
demo's settings as ``configs/demo_override.json`` and runs

    python -m monai.bundle run --config_file "['configs/train.json', 'configs/demo_override.json']"

in that folder, so that what the demo shows is what the bundles do (in a process forked from one that
imported torch and MONAI once, :mod:`~anatomask_components.demo.bundle_process`: ~6 s less per stage). The
same settings are written into the copy's ``configs/inference.json``, which therefore runs on its own there.
The run's stdout goes to ``<run>/demo_<step>.log``; its progress lines (stage, iteration, loss, time left)
are echoed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from anatomask_components.data.fingerprint import window_fingerprint
from anatomask_components.demo.bundle_process import StageServer, stage_servers_available
from anatomask_components.demo.settings import FINETUNE_INITS, DemoSettings, clock

__all__ = ["BUNDLES_DIR", "DemoError", "prepare_bundle", "run_bundle", "run_demo"]

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
PRETRAIN_BUNDLE = "anatomask_pretrain"
FINETUNE_BUNDLE = "anatomask_finetune_flare22"
# run name -> the pretraining bundle's override of its method (SparK: the RandomMasking strategy), or None for
# the bundle's defaults (AnatoMask's TeacherReconstructionMasking)
PRETRAIN_RUNS = {"spark": "train_spark.json", "anatomask": None}
# FLARE22 ids of the organs that case C holds and the demo's target averages (liver, spleen, stomach, aorta)
CURVE_ORGANS = {1: "liver", 3: "spleen", 11: "stomach", 5: "aorta"}
# copied into each run folder; models/, runs/, eval/ are the run's own
BUNDLE_FILES = ("configs", "docs", "LICENSE", "large_files.yml")
# log lines worth echoing while a bundle runs (the rest stays in the run's log file)
_ECHO = re.compile(
    r"anatomask_components\.(handlers|inference|checkpointing)|Metrics --|Key metric"
    r"|^\[fingerprint\] (no|reusing|CT)|ERROR|Error|Traceback|WARNING.*invalid"
)
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ - (\S+ - )?(INFO|WARNING|ERROR) - ")


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and its log file."""


@dataclass
class StageResult:
    """One bundle run: what ran, how long, how much memory."""

    name: str
    folder: str
    command: list[str]
    log: str
    wall_s: float
    peak_rss_mb: float
    outputs: dict[str, Any] = field(default_factory=dict)


def _network_override(settings: DemoSettings) -> dict[str, Any]:
    return {
        "seed": settings.seed,
        "spacing": list(settings.spacing),
        "roi_size": list(settings.roi_size),
        "stunet_depths": list(settings.depths),
        "stunet_dims": list(settings.dims),
    }


def pretrain_override(
    settings: DemoSettings,
    run: str,
    datalist: Path,
    cache_dir: Path | None = None,
    fingerprint: Path | None = None,
) -> dict[str, Any]:
    """The pretraining bundle's settings for one demo run (``run``: ``"spark"`` or ``"anatomask"``, whose
    method override of :data:`PRETRAIN_RUNS` they include; ``cache_dir``: a preprocessing cache shared by the
    runs, which preprocess identically; ``fingerprint``: the CT statistics to normalise with, None to compute
    them from the pretraining scans)."""
    method = PRETRAIN_RUNS[run]
    configs = BUNDLES_DIR / PRETRAIN_BUNDLE / "configs"
    return {
        **(json.loads((configs / method).read_text(encoding="utf-8")) if method is not None else {}),
        **_network_override(settings),
        **({"cache_dir": str(cache_dir)} if cache_dir is not None else {}),
        **({"fingerprint": str(fingerprint)} if fingerprint is not None else {}),
        "datalist": str(datalist),
        "mask_ratio": settings.mask_ratio,
        "hard_ratio_end": settings.hard_ratio_end,
        "max_epochs": settings.pretrain_epochs,
        "warmup_epochs": settings.pretrain_warmup_epochs,
        "learning_rate": settings.pretrain_lr,
        "ema_momentum_start": settings.ema_momentum[0],
        "ema_momentum_end": settings.ema_momentum[1],
        "batch_size": 1,
        "num_workers": 0,
        "rotate_prob": 0.0,
        "scale_prob": 0.0,
        "save_every_epochs": settings.save_every_epochs,
        "keep_last_checkpoints": 1,
        "progress_every_iterations": settings.progress_every,
    }


def finetune_override(
    settings: DemoSettings,
    datalist: Path,
    test_scan: Path,
    encoder: Path | None,
    cache_dir: Path | None = None,
    fingerprint: Path | None = None,
) -> dict[str, Any]:
    """The FLARE22 bundle's settings for one demo run (``encoder``: a pretraining export, or None;
    ``cache_dir``: a preprocessing cache shared by the runs; ``fingerprint``: the CT statistics to normalise
    with, given to the run from scratch so that all three map intensities as pretraining did; the runs from
    an encoder find the same file beside it)."""
    return {
        **_network_override(settings),
        **({"cache_dir": str(cache_dir)} if cache_dir is not None else {}),
        **({"fingerprint": str(fingerprint)} if fingerprint is not None else {}),
        "datalist": str(datalist),
        "dataset_dir": str(test_scan),
        "pretrained_weights": str(encoder) if encoder is not None else "",
        "max_epochs": settings.finetune_epochs,
        "iterations_per_epoch": settings.iterations_per_epoch,
        "val_interval": settings.val_interval,
        "learning_rate": settings.finetune_lr,
        "num_samples": 1,
        "num_workers": 0,
        "augmentation": {
            **{key: 0.0 for key in settings.augmentation_off},
            "enhance_prob": settings.enhance_prob,
            "enhance_range": list(settings.enhance_range),
        },
        "save_every_epochs": settings.curve_every_epochs,
        "keep_last_checkpoints": settings.finetune_epochs,
        "sw_batch_size": 1,
        "sw_overlap": settings.sw_overlap,
        "progress_every_iterations": settings.progress_every,
    }


def _write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4) + "\n")
    return path


def prepare_bundle(bundle: str | os.PathLike, folder: str | os.PathLike, override: Mapping[str, Any]) -> Path:
    """A fresh copy of a bundle with the demo's override, runnable on its own.

    Copies the bundle's configs, docs and licence into ``folder`` (emptied first), writes ``override`` as
    ``configs/demo_override.json`` and applies it to the copy's ``configs/inference.json`` (the keys that
    file defines), so that ``python -m monai.bundle run --config_file configs/inference.json`` uses the
    same network, spacing and data there.

    Returns:
        the folder.
    """
    source, folder = Path(bundle), Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in BUNDLE_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, folder / name)
        elif path.is_file():
            shutil.copy2(path, folder / name)
    _write_json(folder / "configs" / "demo_override.json", dict(override))
    inference = folder / "configs" / "inference.json"
    if inference.is_file():
        config = json.loads(inference.read_text(encoding="utf-8"))
        config.update({k: v for k, v in override.items() if k in config})
        _write_json(inference, config)
    return folder


def _echo(line: str, indent: str = "    ") -> None:
    if _ECHO.search(line):
        print(indent + _LOG_PREFIX.sub("", line.rstrip()), flush=True)


def run_bundle(
    folder: str | os.PathLike,
    config_files: Sequence[str],
    name: str,
    log_name: str,
    server: StageServer | None = None,
) -> StageResult:
    """Run ``python -m monai.bundle run`` in a bundle folder, echoing progress; measure time and memory.

    Args:
        folder: the bundle folder (the working directory of the run).
        config_files: config files relative to ``folder``, merged in order.
        name: the stage name (for messages).
        log_name: file name of the full log inside ``folder``.
        server: fork the run from this :class:`~anatomask_components.demo.bundle_process.StageServer`
            (torch and MONAI imported once); None: start the command in a fresh interpreter (its wall
            time then includes ~6 s of imports).

    Returns:
        the :class:`StageResult` (peak RSS of the bundle process, from the kernel's accounting).

    Raises:
        DemoError: the run exited with an error; the message names the log and shows its end.
    """
    folder = Path(folder)
    files = (
        config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    )
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        files,
        "--meta_file",
        "configs/metadata.json",
        "--logging_file",
        "configs/logging.conf",
    ]
    log_path = folder / log_name
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    if server is None:
        code, peak_kib = _run_command(command, folder, log_path, env)
    else:
        code, peak_kib = server.run(folder, config_files, log_path, _echo, env)
    wall = time.perf_counter() - start
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise DemoError(f"{name} failed (exit code {code}); full log: {log_path}\n{tail}")
    return StageResult(name, str(folder), ["python", *command[1:]], str(log_path), wall, peak_kib / 1024.0)


def _run_command(command: list[str], folder: Path, log_path: Path, env: dict[str, str]) -> tuple[int, float]:
    """The command in a fresh interpreter, output into ``log_path`` and echoed; (exit code, peak RSS KiB)."""
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            _echo(line)
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), float(usage.ru_maxrss)


def _write_demo_datalist(data: Path) -> Path:
    """The pretraining datalist of the demo: the three example CT (unlabelled) for training, and case A as
    the scan that the pretraining bundle's inference config reconstructs."""
    pretrain = json.loads((data / "datalists" / "pretrain.json").read_text(encoding="utf-8"))
    case_a = next(item for item in pretrain["training"] if "A_ct" in item["image"])
    return _write_json(
        data / "datalists" / "demo_pretrain.json",
        {"training": pretrain["training"], "validation": [], "test": [case_a]},
    )


def run_demo(
    output: str | os.PathLike = "demo_output",
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    report_only: bool = False,
    partial_case_b: bool = False,
) -> Path:
    """Run the whole demo and write ``<output>/report.html`` and ``report.md``.

    Args:
        output: output folder; its run folders are recreated, its ``data/`` is refreshed.
        quick: the quick preset (:meth:`DemoSettings.preset`): every kind of stage in under 5 minutes.
        seed: seed of every run.
        cache_dir: where the example archive is kept (default ``$ANATOMASK_CACHE`` or
            ``~/.cache/anatomask``).
        report_only: only rebuild the report from ``<output>/results.json`` of an earlier run.
        partial_case_b: fine-tune on case B's aorta too (:attr:`DemoSettings.partial_case_b`).

    Returns:
        the path of ``report.html``.
    """
    from anatomask_components.demo.report import write_report

    output = Path(output).resolve()
    results_path = output / "results.json"
    if report_only:
        if not results_path.is_file():
            raise DemoError(f"{results_path} does not exist: run the demo first")
        return write_report(output, json.loads(results_path.read_text(encoding="utf-8")))

    from anatomask_components.data.examples import fetch_examples

    settings = replace(DemoSettings.preset(quick=quick, seed=seed), partial_case_b=partial_case_b)
    start = time.perf_counter()
    plan = [
        *(f"pretrain_{run}" for run in PRETRAIN_RUNS),
        *(f"reconstruct_{run}" for run in PRETRAIN_RUNS),
        *(f"finetune_{init}" for init in settings.finetune_inits),
        *(f"evaluate_{init}" for init in settings.finetune_inits),
        *(f"infer_{init}" for init in settings.finetune_inits),
    ]
    total_stages = len(plan) + 4  # + fetch, analysis, curve, report

    def announce(step: int, name: str, what: str) -> None:
        print(
            f"\n[demo {step}/{total_stages}] {name}: {what} (elapsed {clock(time.perf_counter() - start)})",
            flush=True,
        )

    print(
        f"[demo] {'quick' if quick else 'full'} demo into {output}: pretraining "
        f"{settings.pretrain_iterations} iterations x 2, fine-tuning {settings.finetune_iterations} "
        f"iterations x {len(settings.finetune_inits)} ({', '.join(settings.finetune_inits)}), seed {seed}",
        flush=True,
    )
    announce(1, "fetch", "example CT from the TotalSegmentator 2.18.0 source archive (sha256-pinned)")
    data = output / "data"
    fetch_start = time.perf_counter()
    fetch_examples(str(data), None if cache_dir is None else str(cache_dir))
    fetch_seconds = time.perf_counter() - fetch_start
    pretrain_datalist = _write_demo_datalist(data)
    # the examples were just rewritten, so an earlier demo's preprocessed volumes can never be hits
    shutil.rmtree(output / "cache", ignore_errors=True)
    flare_datalist = data / "datalists" / "flare22.json"
    # fine-tuning trains on A, and on B's aorta where the settings say so (its other organs out of the loss)
    finetune_datalist = (
        data / "datalists" / ("flare22_partial.json" if settings.partial_case_b else "flare22.json")
    )
    test_scan = data / "images" / "C_ct_dicom"
    # one CT mapping for every run: the pretraining runs store it beside their encoders, fine-tuning reads it
    window = None
    if settings.ct_window is not None:
        window = data / "ct_window_fingerprint.json"
        _write_json(window, window_fingerprint(*settings.ct_window))

    stages: list[StageResult] = []
    # each stage forked from one interpreter that imported torch and MONAI (not where the OS cannot fork)
    server = StageServer(output / "stage_server.log") if stage_servers_available() else None
    with server or contextlib.nullcontext():
        step = 1
        for run, method in PRETRAIN_RUNS.items():
            step += 1
            name = f"pretrain_{run}"
            announce(
                step,
                name,
                f"{settings.pretrain_iterations} iterations, "
                + (f"the bundle's configs/{method}" if method else "the bundle's AnatoMask masking"),
            )
            folder = prepare_bundle(
                BUNDLES_DIR / PRETRAIN_BUNDLE,
                output / name,
                pretrain_override(settings, run, pretrain_datalist, output / "cache" / "pretrain", window),
            )
            result = run_bundle(
                folder, ["configs/train.json", "configs/demo_override.json"], name, "demo_train.log", server
            )
            result.outputs = {
                "training_log": str(folder / "runs" / "training_log.jsonl"),
                "model": str(folder / "models" / "model.pt"),
                "encoder": str(folder / "models" / "encoder.pt"),
                "checkpoints": str(folder / "runs" / "checkpoints"),
            }
            stages.append(result)
        for run in PRETRAIN_RUNS:
            step += 1
            name = f"reconstruct_{run}"
            announce(
                step, name, "the pretraining bundle's inference.json on case A (masked input, reconstruction)"
            )
            folder = output / f"pretrain_{run}"
            result = run_bundle(folder, ["configs/inference.json"], name, "demo_inference.log", server)
            result.outputs = {"eval_dir": str(folder / "eval")}
            stages.append(result)

        for init in settings.finetune_inits:
            step += 1
            name = f"finetune_{init}"
            source = FINETUNE_INITS[init]
            encoder = output / f"pretrain_{source}" / "models" / "encoder.pt" if source is not None else None
            announce(
                step,
                name,
                f"FLARE22 bundle on case A{' and the aorta of case B' if settings.partial_case_b else ''}, "
                f"{settings.finetune_iterations} iterations, init {init}",
            )
            # every run normalises CT with the pretraining set's statistics (the encoders carry them)
            fingerprint = (
                output / "pretrain_anatomask" / "models" / "fingerprint.json" if encoder is None else None
            )
            folder = prepare_bundle(
                BUNDLES_DIR / FINETUNE_BUNDLE,
                output / name,
                finetune_override(
                    settings,
                    finetune_datalist,
                    test_scan,
                    encoder,
                    output / "cache" / "finetune",
                    fingerprint,
                ),
            )
            result = run_bundle(
                folder, ["configs/train.json", "configs/demo_override.json"], name, "demo_train.log", server
            )
            result.outputs = {
                "training_log": str(folder / "runs" / "training_log.jsonl"),
                "weight_transfer": str(folder / "runs" / "weight_transfer.json"),
                "model": str(folder / "models" / "model.pt"),
            }
            stages.append(result)
        for init in settings.finetune_inits:
            step += 1
            name = f"evaluate_{init}"
            announce(step, name, "evaluate.json on case C (DICOM series; DSC and NSD in its own geometry)")
            folder = output / f"finetune_{init}"
            configs = ["configs/train.json", "configs/demo_override.json", "configs/evaluate.json"]
            result = run_bundle(folder, configs, name, "demo_evaluate.log", server)
            result.outputs = {
                "summary": str(folder / "eval" / "summary.json"),
                "metrics": str(folder / "eval" / "metrics.csv"),
            }
            stages.append(result)
        for init in settings.finetune_inits:
            step += 1
            name = f"infer_{init}"
            announce(step, name, "inference.json on case C (label map in the DICOM series' geometry)")
            folder = output / f"finetune_{init}"
            result = run_bundle(folder, ["configs/inference.json"], name, "demo_inference.log", server)
            report = json.loads(
                (folder / "predictions" / "inference_report.json").read_text(encoding="utf-8")
            )
            result.outputs = {
                "label_maps": [str(folder / case["label_map"]) for case in report["written"]],
                "cases": report["written"],
            }
            stages.append(result)

    step += 1
    announce(step, "analysis", "what the teachers find hard: top-k patches in body and organs, figure data")
    from anatomask_components.demo.analysis import analyse_pretraining

    analysis_start = time.perf_counter()
    analysis = analyse_pretraining(output, settings, flare_datalist)
    analysis["seconds"] = time.perf_counter() - analysis_start

    step += 1
    announce(
        step,
        "curve",
        "DSC on case C against fine-tuning iterations, from the kept checkpoints; slabs of A as thin as C",
    )
    curve_start = time.perf_counter()
    curves = finetune_curves(output, settings, flare_datalist)
    slabs = thin_slab_agreement(output, settings, flare_datalist)
    curve_seconds = time.perf_counter() - curve_start

    results = {
        "settings": asdict(settings),
        "seed": seed,
        "output": str(output),
        "data": str(data),
        "fetch_seconds": fetch_seconds,
        "stages": [asdict(s) for s in stages],
        "analysis": analysis,
        "curves": {
            "runs": curves,
            "seconds": curve_seconds,
            "organs": list(CURVE_ORGANS.values()),
            "organ_hu": organ_intensities(flare_datalist, settings),
        },
        "slabs": slabs,
        "environment": _environment(),
    }
    results["total_seconds_before_report"] = time.perf_counter() - start
    _write_json(results_path, results)
    step += 1
    announce(step, "report", "figures, report.html and report.md")
    report = write_report(output, results)
    print(f"\n[demo] done in {clock(time.perf_counter() - start)}: {report}", flush=True)
    return report


def finetune_curves(output: Path, settings: DemoSettings, datalist: Path) -> dict[str, list[dict[str, Any]]]:
    """DSC on case C per kept checkpoint of each fine-tuning run (:func:`~anatomask_components.demo.curve.
    dsc_curve`), with one progress line per run."""
    from anatomask_components.data.labels import FLARE22_CLASSES
    from anatomask_components.demo.curve import dsc_curve

    test_item = json.loads(datalist.read_text(encoding="utf-8"))["test"][0]
    curves = {}
    for init in settings.finetune_inits:
        curves[init] = dsc_curve(
            output / f"finetune_{init}", asdict(settings), test_item, CURVE_ORGANS, len(FLARE22_CLASSES) + 1
        )
        last = curves[init][-1] if curves[init] else {"iteration": 0, "dsc": {}}
        print(
            f"    {init}: {len(curves[init])} checkpoints, at iteration {last['iteration']}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in last["dsc"].items()),
            flush=True,
        )
    return curves


def thin_slab_agreement(output: Path, settings: DemoSettings, datalist: Path) -> dict[str, Any]:
    """Each run's model on slabs of case A as thick as case C, against its whole-scan label map of A
    (:func:`~anatomask_components.demo.curve.slab_agreement`), with one progress line per run.

    Returns:
        ``{"thickness_mm": case C's extent, "runs": {init: slab_agreement's result}}``.
    """
    import nibabel as nib

    from anatomask_components.data.labels import FLARE22_CLASSES
    from anatomask_components.demo.curve import slab_agreement

    lists = json.loads(datalist.read_text(encoding="utf-8"))
    thickness_mm = scan_thickness_mm(nib.load(lists["test"][0]["label"]))
    runs = {}
    for init in settings.finetune_inits:
        runs[init] = slab_agreement(
            output / f"finetune_{init}",
            asdict(settings),
            lists["training"][0],
            CURVE_ORGANS,
            len(FLARE22_CLASSES) + 1,
            thickness_mm,
        )
        means = [float(np.mean(list(s["agreement"].values()))) for s in runs[init]["slabs"] if s["agreement"]]
        print(
            f"    {init}: slabs of A {thickness_mm:g} mm thick (case C's) against the whole scan: mean DSC "
            + (", ".join(f"{m:.3f}" for m in means) or "no organ there"),
            flush=True,
        )
    return {"thickness_mm": thickness_mm, "runs": runs}


def scan_thickness_mm(image) -> float:
    """Extent of a scan along the patient's superior-inferior axis, in mm (``image``: a nibabel image)."""
    axis = int(np.argmax(np.abs(image.affine[2, :3])))
    return float(image.shape[axis] * np.linalg.norm(image.affine[:3, axis]))


def organ_intensities(datalist: Path, settings: DemoSettings) -> dict[str, dict[str, float]]:
    """Median HU of the curve's organs in case A (training) and C (test), for the report's explanation."""
    from anatomask_components.demo.curve import organ_hu

    lists = json.loads(datalist.read_text(encoding="utf-8"))
    items = {"A": lists["training"][0], "C": lists["test"][0]}
    return {case: organ_hu(item, CURVE_ORGANS, settings.spacing) for case, item in items.items()}


def _environment() -> dict[str, Any]:
    """Versions and the device, for the report."""
    import platform

    import monai
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
