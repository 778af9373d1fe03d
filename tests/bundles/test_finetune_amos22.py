"""The anatomask_finetune_amos22 bundle: CT and MR in one model, normalised per case by modality."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from finetune_common import (
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

from anatomask_components.data.datalists import write_datalist
from anatomask_components.data.phantoms import make_affine, make_phantom, write_phantom_dataset
from anatomask_components.data.writers import write_volume

BUNDLE = "anatomask_finetune_amos22"
NUM_CLASSES = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("amos22")
    split = {"n_cases": 3, "shape": (40, 40, 40), "num_classes": NUM_CLASSES, "fractions": (1.0, 0.0, 0.0)}
    ct = write_phantom_dataset(root / "ct", modality="CT", **split)["training"]
    mr = write_phantom_dataset(root / "mr", modality="MR", seed=20, **split)["training"]
    datalist = {"training": [ct[0], mr[0]], "validation": [ct[1]], "test": [ct[2], mr[2]]}
    write_datalist(datalist, root / "datalist.json")
    oblique = make_affine((1.2, 0.9, 3.0), flip=(False, True, True), rotation_deg=(-6, 10, 3))
    image, _, _ = make_phantom((36, 42, 18), num_classes=NUM_CLASSES, seed=4, affine=oblique, modality="MR")
    write_volume(root / "scans" / "mr_oblique.nii.gz", image, oblique)
    return {"root": root, "datalist": root / "datalist.json", "items": datalist, "scans": root / "scans"}


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
    assert (
        len(channel_def) == NUM_CLASSES
        and channel_def["9"] == "postcava"
        and channel_def["15"] == "prostate/uterus"
    )


def test_normalisation_follows_each_cases_modality(data, tmp_path):
    stats = {"mean": 100.0, "std": 50.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0}
    flow = workflow(
        BUNDLE,
        ["train.json", "small_override.json"],
        "train",
        bundle_root=str(tmp_path),
        dataset_dir=str(data["datalist"]),
        normalization={"CT": "ct", "MR": "zscore"},
        fingerprint={"intensity": {"CT": stats}},
    )
    preprocessing = flow.parser.get_parsed_content("validate#preprocessing")
    ct_item, mr_item = data["items"]["test"]
    assert (ct_item["modality"], mr_item["modality"]) == ("CT", "MR")
    ct = preprocessing(dict(ct_item))["image"][0]
    raw_ct = torch.from_numpy(nib.load(ct_item["image"]).get_fdata().astype(np.float32))
    expected = (raw_ct.clamp(-50.0, 300.0) - 100.0) / 50.0
    torch.testing.assert_close(ct.as_tensor(), expected, atol=1e-4, rtol=1e-4)
    mr = preprocessing(dict(mr_item))["image"][0].double()
    assert abs(float(mr.mean())) < 1e-4 and abs(float(mr.std(correction=0)) - 1.0) < 1e-4


@pytest.mark.slow
def test_train_evaluate_infer(data, tmp_path):
    encoder = encoder_export(tmp_path / "encoder.pt", seed=1)
    result = train(BUNDLE, tmp_path / "train", data["datalist"], tmp_path / "encoder.pt")
    check_training(result, encoder, in_channels=1)

    output_dir = evaluate(BUNDLE, tmp_path / "eval", data["datalist"], result["model_path"])
    check_metrics(output_dir, ["ct_images_case_002", "mr_images_case_002"], labels_of(BUNDLE))

    # a datalist's test section (CT and MR items, modality per item) and a folder of MR scans
    predictions = infer(BUNDLE, tmp_path / "infer_list", data["datalist"], result["model_path"])
    for item, case in zip(data["items"]["test"], ["ct_images_case_002", "mr_images_case_002"]):
        check_same_geometry(Path(item["image"]), predictions / f"{case}_seg.nii.gz", NUM_CLASSES)
    predictions = infer(BUNDLE, tmp_path / "infer_mr", data["scans"], result["model_path"], modality="MR")
    check_same_geometry(
        data["scans"] / "mr_oblique.nii.gz", predictions / "mr_oblique_seg.nii.gz", NUM_CLASSES
    )
