"""The anatomask_finetune_autopet bundle: 2-channel PET/CT, adapted input convolution, lesion-free studies."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from finetune_common import (
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

from anatomask_components.data.datalists import autopet_datalist, write_datalist
from anatomask_components.data.phantoms import make_affine, make_pet_ct_phantom
from anatomask_components.data.writers import write_volume
from anatomask_components.evaluation import voxel_spacing
from anatomask_components.handlers import PretrainedWeightsLoader
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.weights import STUNET_INPUT_CONV_KEYS

BUNDLE = "anatomask_finetune_autopet"


def _study(folder: Path, num_lesions: int, seed: int, affine=None) -> None:
    ct, suv, label, affine = make_pet_ct_phantom(
        (40, 40, 40), num_lesions=num_lesions, seed=seed, affine=affine
    )
    for name, volume in [("CTres", ct), ("SUV", suv), ("SEG", label)]:
        write_volume(folder / f"{name}.nii.gz", volume, affine)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("autopet")
    studies = {"PETCT_a": 2, "PETCT_b": 0, "PETCT_c": 3, "PETCT_d": 0, "PETCT_e": 2}  # lesions per study
    for seed, (patient, lesions) in enumerate(studies.items()):
        _study(root / "dataset" / patient / "01-01-2000-NA-PET-CT", lesions, seed)
    items = {
        Path(i["label"]).parts[-3]: i
        for i in autopet_datalist(root / "dataset", fractions=(1, 0, 0))["training"]
    }
    datalist = {
        "training": [items["PETCT_a"], items["PETCT_b"]],  # one study without lesions
        "validation": [items["PETCT_c"]],
        "test": [items["PETCT_d"], items["PETCT_e"]],
    }
    write_datalist(datalist, root / "datalist.json")
    oblique = make_affine(
        (2.0, 2.0, 3.0), flip=(True, True, False), rotation_deg=(0, 5, -12), origin=(100, 80, -600)
    )
    _study(root / "scans" / "PETCT_x" / "03-03-2003-NA-PET-CT", 1, 11, affine=oblique)
    return {"root": root, "datalist": root / "datalist.json", "items": datalist, "scans": root / "scans"}


@pytest.mark.parametrize(
    ("names", "kind"),
    [(["train.json"], "train"), (["train.json", "evaluate.json"], "train"), (["inference.json"], "infer")],
)
def test_properties(names, kind, data, tmp_path):
    source = data["datalist"] if kind == "train" else data["scans"]
    flow = workflow(BUNDLE, names, kind, bundle_root=str(tmp_path), dataset_dir=str(source))
    assert flow.check_properties() == []


def test_labels_and_channels_agree_across_configs():
    metadata = check_metadata(BUNDLE)["network_data_format"]
    inference = json.loads((configs(BUNDLE) / "inference.json").read_text())
    train_config = json.loads((configs(BUNDLE) / "train.json").read_text())
    assert labels_of(BUNDLE) == metadata["outputs"]["pred"]["channel_def"] == inference["labels"]
    assert labels_of(BUNDLE) == {"0": "background", "1": "lesion"}
    assert (
        metadata["inputs"]["image"]["num_channels"]
        == train_config["in_channels"]
        == inference["in_channels"]
        == 2
    )
    assert train_config["channel_modalities"] == inference["channel_modalities"] == ["CT", "PET"]
    assert train_config["normalization"] == inference["normalization"] == {"CT": "ct", "PET": "suv"}


def test_first_convolution_built_from_one_channel_weights(tmp_path):
    """The bundle's 2-channel STU-Net-B gets each pretrained 1-channel kernel / 2 in both channels."""
    torch.manual_seed(5)
    encoder = AnatoMaskPretrainModel(STUNet(1, 1, size="B")).encoder_state_dict()
    torch.save(encoder, tmp_path / "encoder.pt")
    flow = workflow(BUNDLE, ["inference.json"], "infer", bundle_root=str(tmp_path), dataset_dir=str(tmp_path))
    network = flow.parser.get_parsed_content("network_def")
    assert network.in_channels == 2 and network.out_channels == 2

    report = PretrainedWeightsLoader(str(tmp_path / "encoder.pt"), network)()

    assert report.num_network_tensors == 130 and report.num_transferred == 50
    assert (len(report.loaded), set(report.adapted), len(report.missing)) == (
        48,
        set(STUNET_INPUT_CONV_KEYS),
        80,
    )
    for key in STUNET_INPUT_CONV_KEYS:
        kernel = network.state_dict()[key]
        assert kernel.shape[1] == 2
        assert torch.equal(kernel[:, :1], encoder[key] / 2) and torch.equal(kernel[:, 1:], encoder[key] / 2)


@pytest.mark.slow
def test_train_evaluate_infer(data, tmp_path):
    encoder = encoder_export(tmp_path / "encoder.pt", seed=2)
    result = train(BUNDLE, tmp_path / "train", data["datalist"], tmp_path / "encoder.pt")
    check_training(result, encoder, in_channels=2)
    assert result["network"].in_channels == 2 and TINY["dims"][0] == result["network"].dims[0]

    output_dir = evaluate(BUNDLE, tmp_path / "eval", data["datalist"], result["model_path"])
    cases = ["PETCT_d_01-01-2000-NA-PET-CT", "PETCT_e_01-01-2000-NA-PET-CT"]
    rows = check_metrics(output_dir, cases, labels_of(BUNDLE), ("false_positive_ml", "false_negative_ml"))
    lesion_free = rows[0]
    assert lesion_free["reference_voxels"] == "0" and float(lesion_free["false_negative_ml"]) == 0.0
    # scored on the label's own grid
    voxel_ml = float(np.prod(voxel_spacing(nib.load(data["items"]["test"][0]["label"]).affine))) / 1000.0
    predicted = int(lesion_free["predicted_voxels"])
    # without reference lesions every predicted voxel is a false positive; nothing predicted -> undefined
    assert float(lesion_free["false_positive_ml"]) == pytest.approx(predicted * voxel_ml)
    assert lesion_free["dsc"] == ("" if predicted == 0 else "0.0")

    predictions = infer(BUNDLE, tmp_path / "infer", data["scans"], result["model_path"])
    study = data["scans"] / "PETCT_x" / "03-03-2003-NA-PET-CT"
    check_same_geometry(study / "SUV.nii.gz", predictions / "PETCT_x_03-03-2003-NA-PET-CT_seg.nii.gz", 2)
