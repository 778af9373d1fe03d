"""The anatomask_finetune_flare22 bundle: properties, training, evaluation, inference, MONAI Label use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from finetune_common import (
    BUNDLES,
    TINY,
    check_metadata,
    check_metrics,
    check_same_geometry,
    check_training,
    configs,
    encoder_export,
    evaluate,
    infer,
    labels_of,
    train,
    workflow,
)
from monai.transforms import LoadImaged, SaveImaged

from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.phantoms import (
    make_affine,
    make_phantom,
    phantom_fingerprint,
    write_phantom_dataset,
)
from anatomask_components.data.writers import write_dicom_series, write_volume
from anatomask_components.networks import STUNet

BUNDLE = "anatomask_finetune_flare22"
NUM_CLASSES = 14


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flare22")
    datalist = write_phantom_dataset(
        root / "dataset", n_cases=3, shape=(40, 40, 40), num_classes=NUM_CLASSES, fractions=(0.34, 0.33, 0.33)
    )
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    # scans to segment: anisotropic, oblique and flipped grids in NIfTI, NRRD and a DICOM series
    scans = root / "scans"
    oblique = make_affine(
        (0.9, 1.3, 2.5), flip=(True, False, True), rotation_deg=(8, -4, 15), origin=(5, -20, 40)
    )
    image, _, _ = make_phantom((44, 38, 20), num_classes=NUM_CLASSES, seed=7, affine=oblique)
    write_volume(scans / "oblique.nii.gz", image, oblique)
    lps = make_affine((1.1, 0.8, 2.0), flip=(True, True, False), origin=(-30, 12, -8))
    write_volume(scans / "nrrd" / "lps.nrrd", image, lps)
    write_dicom_series(scans / "dicom_series", image, make_affine((0.7, 0.7, 2.0), rotation_deg=(0, 0, 90)))
    (scans / "truncated.nii.gz").write_bytes(b"\x1f\x8b broken")
    return {
        "root": root,
        "datalist": root / "dataset" / "datalist.json",
        "test_image": Path(datalist["test"][0]["image"]),
        "scans": scans,
    }


@pytest.mark.parametrize(
    ("names", "kind"),
    [(["train.json"], "train"), (["train.json", "evaluate.json"], "train"), (["inference.json"], "infer")],
)
def test_properties(names, kind, data, tmp_path):
    source = data["datalist"] if kind == "train" else data["scans"]
    flow = workflow(BUNDLE, names, kind, bundle_root=str(tmp_path), dataset_dir=str(source))
    assert flow.check_properties() == []


def test_labels_agree_across_configs():
    metadata = check_metadata(BUNDLE)
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    inference = json.loads((configs(BUNDLE) / "inference.json").read_text())
    assert labels_of(BUNDLE) == channel_def == inference["labels"]
    assert list(channel_def.values())[1:] == [
        "liver", "right kidney", "spleen", "pancreas", "aorta", "inferior vena cava", "right adrenal gland",
        "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney",
    ]  # fmt: skip


@pytest.mark.slow
def test_train_evaluate_infer(data, tmp_path):
    encoder = encoder_export(tmp_path / "encoder.pt")
    result = train(BUNDLE, tmp_path / "train", data["datalist"], tmp_path / "encoder.pt")
    check_training(result, encoder, in_channels=1)

    output_dir = evaluate(BUNDLE, tmp_path / "eval", data["datalist"], result["model_path"])
    test_case = data["test_image"].name.removesuffix(".nii.gz")
    check_metrics(output_dir, [test_case], labels_of(BUNDLE))
    check_same_geometry(
        data["test_image"], output_dir / "predictions" / f"{test_case}_seg.nii.gz", NUM_CLASSES
    )

    predictions = infer(
        BUNDLE, tmp_path / "infer", data["scans"], result["model_path"], save_probabilities=True
    )
    scans = data["scans"]
    for case, scan in [
        ("oblique", scans / "oblique.nii.gz"),
        ("nrrd_lps", scans / "nrrd" / "lps.nrrd"),
        ("dicom_series", scans / "dicom_series"),
    ]:
        check_same_geometry(scan, predictions / f"{case}_seg.nii.gz", NUM_CLASSES)
    probabilities = np.asarray(nib.load(predictions / "oblique_probabilities.nii.gz").dataobj)
    assert probabilities.shape == (44, 38, 20, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)
    report = json.loads((predictions / "inference_report.json").read_text())
    assert [c["case"] for c in report["written"]] == ["dicom_series", "nrrd_lps", "oblique"]
    assert [c["case"] for c in report["failed"]] == ["truncated"]
    assert "truncated.nii.gz" in report["failed"][0]["error"]


def test_monai_label_style_inference(data, tmp_path):
    """What MONAI Label's BundleInferTask does: flat preprocessing, inferer, postprocessing without saving."""
    model = tmp_path / "model.pt"
    torch.save(STUNet(1, NUM_CLASSES, **TINY).state_dict(), model)
    write_fingerprint(model, phantom_fingerprint())
    flow = workflow(
        BUNDLE,
        ["inference.json", "small_override.json"],
        "infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(data["scans"]),
        model_path=str(model),
    )
    parser = flow.parser
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(model, weights_only=True), strict=True)
    network.eval()
    pre = list(parser.get_parsed_content("preprocessing").transforms)
    post = [
        t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)
    ]
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(pre[0], LoadImaged)
    scan = str(data["scans"] / "oblique.nii.gz")
    item = {"image": scan, "image_path": scan}
    for transform in pre:
        item = transform(item)
    with torch.no_grad():
        item["pred"] = inferer(item["image"][None], network)[0]
    for transform in post:
        item = transform(item)
    assert item["image_path"] == scan
    assert tuple(item["pred"].shape) == (1, 44, 38, 20)
    written = nib.load(scan)
    np.testing.assert_allclose(np.asarray(item["pred"].affine), written.affine, atol=1e-4)


@pytest.mark.slow
def test_command_line_training(data, tmp_path):
    bundle = BUNDLES / BUNDLE
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", f"['{bundle}/configs/train.json','{bundle}/configs/small_override.json']",
        "--meta_file", f"{bundle}/configs/metadata.json",
        "--logging_file", f"{bundle}/configs/logging.conf",
        "--bundle_root", str(tmp_path),
        "--dataset_dir", str(data["datalist"]),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training from scratch" in done.stdout
    assert (tmp_path / "models" / "model.pt").is_file()
    assert (tmp_path / "runs" / "checkpoints" / "checkpoint_2.pt").is_file()


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(tmp_path):
    """multi_gpu_train.json with torchrun, 2 processes on CPU (gloo): one model.pt, one checkpoint."""
    write_phantom_dataset(
        tmp_path / "dataset",
        n_cases=6,
        shape=(32, 32, 32),
        num_classes=NUM_CLASSES,
        fractions=(0.34, 0.33, 0.33),
    )
    folder = BUNDLES / BUNDLE / "configs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "-m", "monai.bundle", "run",
        "--config_file",
        f"['{folder}/train.json','{folder}/multi_gpu_train.json','{folder}/small_override.json']",
        "--meta_file", f"{folder}/metadata.json",
        "--logging_file", f"{folder}/logging.conf",
        "--bundle_root", str(tmp_path / "run"),
        "--dataset_dir", str(tmp_path / "dataset" / "datalist.json"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("training from scratch") == 2  # the weights loader runs on both ranks
    assert done.stdout.count("saved checkpoint") == 1 and done.stdout.count("val_mean_dice = ") == 1
    saved = torch.load(tmp_path / "run" / "models" / "model.pt", weights_only=True)
    STUNet(1, NUM_CLASSES, **TINY).load_state_dict(saved, strict=True)  # unwrapped: no "module." prefixes
    assert sorted(p.name for p in (tmp_path / "run" / "runs" / "checkpoints").iterdir()) == [
        "checkpoint_2.pt"
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
