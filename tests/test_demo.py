"""The end-to-end demo: its bundle folders, its analysis arithmetic and (needs the index) a quick run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from anatomask_components.data.labels import FLARE22_CLASSES
from anatomask_components.data.phantoms import make_phantom, phantom_fingerprint
from anatomask_components.data.writers import write_volume
from anatomask_components.demo.analysis import CaseVolumes, topk_statistics
from anatomask_components.demo.curve import slab_agreement
from anatomask_components.demo.pipeline import (
    BUNDLES_DIR,
    CURVE_ORGANS,
    FINETUNE_BUNDLE,
    PRETRAIN_BUNDLE,
    finetune_override,
    prepare_bundle,
    pretrain_override,
    scan_thickness_mm,
)
from anatomask_components.demo.report import FIGURES
from anatomask_components.demo.settings import DemoSettings
from anatomask_components.patches import unpatchify
from anatomask_components.strategies import RandomMasking, TeacherReconstructionMasking

# the quick demo's best liver DSC on case C is at least this (measured: see docs/finetune.md)
LIVER_DSC_QUICK = 0.1


def _workflow(folder: Path, names: list[str], workflow_type: str) -> ConfigWorkflow:
    flow = ConfigWorkflow(
        config_file=[str(folder / "configs" / n) for n in names],
        workflow_type=workflow_type,
        meta_file=str(folder / "configs" / "metadata.json"),
        logging_file=str(folder / "configs" / "logging.conf"),
        bundle_root=str(folder),
    )
    flow.initialize()
    return flow


def test_finetune_folder_is_a_fresh_copy_whose_inference_config_runs_alone(tmp_path):
    settings = DemoSettings.preset(quick=True)
    folder = tmp_path / "finetune_scratch"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "stale.pt").write_text("from an earlier demo")
    image, _, affine = make_phantom((24, 24, 16))
    scan = write_volume(tmp_path / "scan.nii.gz", image, affine)
    override = finetune_override(settings, tmp_path / "flare22.json", scan, None)
    original = (BUNDLES_DIR / FINETUNE_BUNDLE / "configs" / "inference.json").read_text()
    prepare_bundle(BUNDLES_DIR / FINETUNE_BUNDLE, folder, override)

    assert not (folder / "models").exists()  # the folder was recreated
    assert {p.name for p in folder.iterdir()} >= {"configs", "docs", "LICENSE", "large_files.yml"}
    assert json.loads((folder / "configs" / "demo_override.json").read_text()) == override
    assert (BUNDLES_DIR / FINETUNE_BUNDLE / "configs" / "inference.json").read_text() == original
    baked = json.loads((folder / "configs" / "inference.json").read_text())
    assert baked["stunet_dims"] == list(settings.dims) and baked["roi_size"] == list(settings.roi_size)
    assert baked["spacing"] == list(settings.spacing) and baked["dataset_dir"] == str(scan)
    assert "max_epochs" not in baked  # only keys that inference.json defines are written into it
    flow = _workflow(folder, ["inference.json"], "infer")
    assert flow.check_properties() == []
    network = flow.parser.get_parsed_content("network_def")
    assert network.dims == settings.dims


def test_pretrain_override_reaches_the_training_workflow(tmp_path):
    settings = DemoSettings.preset(quick=True)
    datalist = tmp_path / "pretrain.json"
    items = [{"image": str(tmp_path / f"{c}.nii.gz")} for c in "ABC"]
    datalist.write_text(json.dumps({"training": items, "validation": [], "test": items[:1]}))
    # the scans do not exist: the CT statistics are given rather than computed from them
    folder = prepare_bundle(
        BUNDLES_DIR / PRETRAIN_BUNDLE,
        tmp_path / "pretrain_anatomask",
        {**pretrain_override(settings, "anatomask", datalist), "fingerprint": phantom_fingerprint()},
    )
    flow = _workflow(folder, ["train.json", "demo_override.json"], "train")
    assert flow.check_properties() == []
    parsed = flow.parser
    assert parsed.get_parsed_content("train#trainer").state.max_epochs == settings.pretrain_epochs
    assert len(parsed.get_parsed_content("train#dataloader")) == 3  # 3 CT at batch 1: 3 iterations per epoch
    schedule = parsed.get_parsed_content("hard_ratio_schedule")
    assert schedule.total_epochs == settings.pretrain_epochs and schedule.end == settings.hard_ratio_end
    teacher = parsed.get_parsed_content("teacher")
    assert (teacher.momentum_start, teacher.momentum_end) == settings.ema_momentum
    iteration = parsed.get_parsed_content("train#iteration")
    assert type(iteration.masking) is TeacherReconstructionMasking
    assert iteration.masking.mask_ratio == settings.mask_ratio
    assert parsed.get_parsed_content("network_def").patch_size == (16, 16, 16)
    inference = _workflow(folder, ["inference.json"], "infer")
    assert inference.check_properties() == []
    assert inference.parser.get_parsed_content("roi_size") == list(settings.roi_size)


def test_the_spark_run_takes_the_bundles_random_masking_override(tmp_path):
    settings = DemoSettings.preset(quick=True)
    datalist = tmp_path / "pretrain.json"
    items = [{"image": str(tmp_path / f"{c}.nii.gz")} for c in "ABC"]
    datalist.write_text(json.dumps({"training": items, "validation": [], "test": items[:1]}))
    spark = json.loads(
        (BUNDLES_DIR / PRETRAIN_BUNDLE / "configs" / "train_spark.json").read_text(encoding="utf-8")
    )
    override = pretrain_override(settings, "spark", datalist)
    assert override["masking"] == spark["masking"]
    assert "masking" not in pretrain_override(settings, "anatomask", datalist)  # the bundle's default
    folder = prepare_bundle(
        BUNDLES_DIR / PRETRAIN_BUNDLE,
        tmp_path / "pretrain_spark",
        {**override, "fingerprint": phantom_fingerprint()},
    )
    assert "masking" not in json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
    flow = _workflow(folder, ["train.json", "demo_override.json"], "train")
    assert flow.check_properties() == []
    iteration = flow.parser.get_parsed_content("train#iteration")
    assert type(iteration.masking) is RandomMasking and iteration.masking.mask_ratio == settings.mask_ratio
    # the EMA teacher is still trained and reported beside SparK's random mask
    assert iteration.teacher is flow.parser.get_parsed_content("teacher")


class _ZeroReconstruction(torch.nn.Module):
    """A scorer whose raw score of a patch is the patch's mean squared intensity."""

    patch_size = (4, 4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_topk_statistics_match_a_hand_count():
    # 8 patches of 4^3 with constant values 0..7: the raw score ranks them by value
    values = torch.arange(8, dtype=torch.float32)[None, :, None].expand(1, 8, 64)
    image = unpatchify(values, (4, 4, 4), (2, 2, 2))
    body = unpatchify((torch.arange(8) >= 4).float()[None, :, None].expand(1, 8, 64), (4, 4, 4), (2, 2, 2))
    labels = torch.zeros(1, 8, 64)
    labels[0, 7, :32] = 3  # half of patch 7 is an organ
    labels = unpatchify(labels, (4, 4, 4), (2, 2, 2))
    case = CaseVolumes(
        "toy", image, image[0, 0].numpy(), body[0, 0].numpy() > 0, labels[0, 0].numpy().astype(int)
    )
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, [1, 4, 6, 7]] = True  # n_masked = 4 at ratio 0.5; k = floor(4 * 0.5) = 2: patches 7 and 6
    stats = topk_statistics(_ZeroReconstruction(), case, [mask], 0.5, 0.5, torch.device("cpu"))["raw"]
    assert stats["k"] == 2 and stats["masks"] == 1
    assert stats["topk_body"] == pytest.approx(1.0)
    assert stats["topk_organs"] == pytest.approx(0.25)
    assert stats["random_body"] == pytest.approx(0.75)  # patches 1, 4, 6, 7
    assert stats["random_organs"] == pytest.approx(0.125)


def _demo_output(tmp_path_factory) -> Path:
    """The quick demo's output: ``$ANATOMASK_DEMO_OUTPUT`` (CI runs the demo first), else a fresh run."""
    given = os.environ.get("ANATOMASK_DEMO_OUTPUT")
    if given:
        output = Path(given)
        assert (output / "results.json").is_file(), f"ANATOMASK_DEMO_OUTPUT={given} holds no demo results"
        return output
    output = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "anatomask_components.cli", "demo", "--output", str(output), "--quick"]
    subprocess.run(command, check=True)
    return output


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    return _demo_output(tmp_path_factory)


@pytest.mark.network
@pytest.mark.slow
def test_quick_demo_report_has_every_figure_and_a_row_per_organ_of_case_c(demo_output):
    results = json.loads((demo_output / "results.json").read_text())
    expected = json.loads(json.dumps(asdict(DemoSettings.preset(quick=True, seed=results["seed"]))))
    assert results["settings"] == expected
    html_text = (demo_output / "report.html").read_text(encoding="utf-8")
    markdown = (demo_output / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        png = demo_output / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
        assert f"figures/{name}.png" in html_text and f"figures/{name}.png" in markdown

    # one DSC row per FLARE22 organ present in case C's reference, plus the mean
    reference = nib.load(demo_output / "data" / "labels" / "C_flare22.nii.gz")
    present = [int(v) for v in np.unique(np.asanyarray(reference.dataobj)) if v > 0]
    labels = json.loads((BUNDLES_DIR / FINETUNE_BUNDLE / "configs" / "train.json").read_text())["labels"]
    table = markdown.split("| organ (FLARE22 id in case C) |")[1].split("\n\n")[0]
    rows = [line.split("|")[1].strip() for line in table.strip().splitlines()[2:]]
    assert rows == [labels[str(v)] for v in present] + [f"mean over these {len(present)} organs"]
    inits = results["settings"]["finetune_inits"]
    assert inits == ["scratch", "anatomask"]  # the quick preset fine-tunes two (its time limit)
    for line in table.strip().splitlines()[2:]:
        # DSC / NSD of each initialisation
        assert len(re.findall(r"\d+\.\d / \d+\.\d", line)) == len(inits), line

    stages = {s["name"]: s for s in results["stages"]}
    assert all(s["wall_s"] > 0 and s["peak_rss_mb"] > 0 for s in stages.values())
    assert not any(
        name.endswith("_spark") and not name.startswith(("pretrain", "reconstruct")) for name in stages
    )
    for init, loaded in (("scratch", None), ("anatomask", 50)):
        transfer = json.loads(Path(stages[f"finetune_{init}"]["outputs"]["weight_transfer"]).read_text())
        assert transfer.get("num_transferred") == loaded  # encoder stages 0-4: 5 x 10 tensors
    # every run left a bundle folder whose inference.json ran there on its own
    for run in ("pretrain_spark", "pretrain_anatomask"):
        assert sorted(p.name for p in (demo_output / run / "eval").iterdir()) == [
            "A_ct_masked.nii.gz",
            "A_ct_reconstruction.nii.gz",
            "A_ct_scores.nii.gz",
        ]
    dicom_shape = (512, 512, 20)
    for init in inits:
        (label_map,) = stages[f"infer_{init}"]["outputs"]["label_maps"]
        assert nib.load(label_map).shape == dicom_shape
        assert (demo_output / f"finetune_{init}" / "models" / "model.pt").is_file()


@pytest.mark.network
@pytest.mark.slow
def test_quick_demo_reports_case_c_against_its_target_with_the_curve(demo_output):
    """The report states the target on case C and whether it was reached, with the wrong explanation gone;
    the curve has one point per kept checkpoint; and even the quick demo's models find case C's liver, a scan
    none of them was trained on (the full demo's figures are in the README)."""
    results = json.loads((demo_output / "results.json").read_text())
    markdown = (demo_output / "report.md").read_text(encoding="utf-8")
    assert "Best initialisation on case C" in markdown and "do not fit even the training case" not in markdown
    liver = {
        init: json.loads((demo_output / f"finetune_{init}" / "eval" / "summary.json").read_text())["classes"][
            "liver"
        ]["dsc"]["mean"]
        for init in results["settings"]["finetune_inits"]
    }
    assert max(liver.values()) >= LIVER_DSC_QUICK, liver
    curves = results["curves"]["runs"]
    settings = DemoSettings.preset(quick=True, seed=results["seed"])
    for init in settings.finetune_inits:
        every = settings.curve_every_epochs
        assert [p["iteration"] for p in curves[init]] == [
            settings.iterations_per_epoch * e for e in range(every, settings.finetune_epochs + 1, every)
        ]
    # every run normalised CT with the pretraining set's fingerprint, and its inference.json holds it
    pretraining = json.loads((demo_output / "pretrain_anatomask" / "models" / "fingerprint.json").read_text())
    for init in settings.finetune_inits:
        inference = json.loads((demo_output / f"finetune_{init}" / "configs" / "inference.json").read_text())
        assert inference["fingerprint"]["intensity"] == pretraining["intensity"], init


@pytest.mark.network
@pytest.mark.slow
def test_quick_demo_reports_how_its_models_label_slabs_of_case_a_as_thin_as_case_c(demo_output):
    """The demo's thin-scan check on real CT: slabs of case A as thick as case C (40 mm), each labelled on its
    own by every run's model; what the report states is what the models do. (Whether a slab agrees
    with the whole scan at >= 0.8 depends on a model that fits A, which the quick demo's 100 iterations do
    not give: the full demo's figures are in docs/finetune.md, "Scans of any size".)"""
    results = json.loads((demo_output / "results.json").read_text())
    datalist = json.loads((demo_output / "data" / "datalists" / "flare22.json").read_text())
    settings = results["settings"]
    thickness_mm = scan_thickness_mm(nib.load(datalist["test"][0]["label"]))
    assert thickness_mm == pytest.approx(40.0)  # case C: 20 slices of 2 mm
    assert results["slabs"]["thickness_mm"] == pytest.approx(thickness_mm)
    assert sorted(results["slabs"]["runs"]) == sorted(settings["finetune_inits"])
    for init in settings["finetune_inits"]:
        entry = slab_agreement(
            demo_output / f"finetune_{init}",
            settings,
            datalist["training"][0],
            CURVE_ORGANS,
            len(FLARE22_CLASSES) + 1,
            thickness_mm,
        )
        reported = results["slabs"]["runs"][init]
        assert (
            entry["thickness_slices"] == reported["thickness_slices"] == round(40.0 / settings["spacing"][2])
        )
        assert entry["whole"] == pytest.approx(reported["whole"], abs=1e-6), init
        assert [s["start"] for s in entry["slabs"]] == [s["start"] for s in reported["slabs"]]
        for mine, theirs in zip(entry["slabs"], reported["slabs"]):
            assert mine["agreement"] == pytest.approx(theirs["agreement"], abs=1e-6), (init, mine)
