"""Datalist builders on generated nnU-Net, MSD, AutoPET and plain-folder layouts; splits and folds."""

from __future__ import annotations

import json

import fire
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from anatomask_components.cli import COMMANDS
from anatomask_components.data.datalists import (
    autopet_datalist,
    build_datalist,
    detect_layout,
    folder_datalist,
    msd_datalist,
    nnunet_datalist,
    split_counts,
    split_items,
    write_datalist,
)
from anatomask_components.data.phantoms import make_affine, write_phantom_dataset
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.data.writers import write_dicom_series, write_volume


def touch(path):
    """Builders only look at names: placeholder files keep these tests fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_nnunet(root, n_cases=10):
    description = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(description))
    for case in range(n_cases):
        for channel in (0, 1):
            touch(root / "imagesTr" / f"pat{case:03d}_{channel:04d}.nii.gz")
        touch(root / "labelsTr" / f"pat{case:03d}.nii.gz")


def all_items(datalist):
    return [item for section in ("training", "validation", "test") for item in datalist[section]]


def test_nnunet_layout_lists_channels_in_order_with_modalities(tmp_path):
    root = tmp_path / "Dataset042_Lesions"
    make_nnunet(root)
    datalist = nnunet_datalist(root, seed=5)
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [7, 1, 2]
    item = next(i for i in all_items(datalist) if i["label"].endswith("pat003.nii.gz"))
    assert item == {
        "image": [str(root / "imagesTr/pat003_0000.nii.gz"), str(root / "imagesTr/pat003_0001.nii.gz")],
        "label": str(root / "labelsTr/pat003.nii.gz"),
        "modality": ["CT", "PET"],
    }
    assert datalist["labels"] == {"0": "background", "1": "lesion"}
    assert datalist["channel_modalities"] == ["CT", "PET"]
    assert detect_layout(root) == "nnunet"


def test_nnunet_missing_channel_file_is_named(tmp_path):
    root = tmp_path / "Dataset042_Lesions"
    make_nnunet(root, n_cases=3)
    (root / "imagesTr" / "pat001_0001.nii.gz").unlink()
    with pytest.raises(
        InvalidScanError, match=r"pat001_0001.nii.gz: channel file of case 'pat001' does not exist"
    ):
        nnunet_datalist(root)


def test_msd_layout_resolves_relative_paths_and_flags_4d_multimodal(tmp_path):
    description = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "tumour"},
        "training": [
            {"image": f"./imagesTr/b{i}.nii.gz", "label": f"./labelsTr/b{i}.nii.gz"} for i in range(5)
        ],
        "test": ["./imagesTs/t0.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    for i in range(5):
        touch(tmp_path / "imagesTr" / f"b{i}.nii.gz")
        touch(tmp_path / "labelsTr" / f"b{i}.nii.gz")
    datalist = msd_datalist(tmp_path / "dataset.json", fractions=(0.6, 0.2, 0.2))
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    assert sorted(i["image"] for i in all_items(datalist)) == [
        str(tmp_path / f"imagesTr/b{i}.nii.gz") for i in range(5)
    ]
    assert all(i["modality"] == ["MR", "MR"] for i in all_items(datalist))
    assert datalist["image_channel_dim"] == -1
    assert detect_layout(tmp_path) == "msd"


def test_autopet_layout_keeps_the_studies_of_a_patient_together(tmp_path):
    for patient in range(6):
        for study in ("01-01-2000-NA-PET-CT", "02-02-2002-NA-PET-CT"):
            for name in ("CTres.nii.gz", "SUV.nii.gz", "SEG.nii.gz"):
                touch(tmp_path / f"PETCT_{patient:02d}" / study / name)
    datalist = autopet_datalist(tmp_path, fractions=(0.5, 0.2, 0.3), seed=1)
    patients = {
        s: {i["label"].split("/")[-3] for i in datalist[s]} for s in ("training", "validation", "test")
    }
    assert [len(patients[s]) for s in ("training", "validation", "test")] == [3, 1, 2]
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [6, 2, 4]
    item = datalist["training"][0]
    study = item["label"].rsplit("/", 1)[0]
    assert item["image"] == [f"{study}/CTres.nii.gz", f"{study}/SUV.nii.gz"] and item["modality"] == [
        "CT",
        "PET",
    ]
    assert detect_layout(tmp_path) == "autopet"


def test_autopet_phantom_dataset_round_trip(tmp_path):
    datalist = write_phantom_dataset(tmp_path, n_cases=3, shape=(16, 16, 16), layout="autopet")
    assert len(all_items(datalist)) == 3
    assert all(len(i["image"]) == 2 for i in all_items(datalist))


def test_folder_layout_counts_a_dicom_series_as_one_scan(tmp_path):
    affine = make_affine((1.0, 1.0, 2.0))
    write_volume(tmp_path / "a" / "one.nii.gz", np.zeros((6, 6, 6), np.float32), affine)
    write_volume(tmp_path / "b" / "two.mha", np.zeros((6, 6, 6), np.float32), affine)
    write_volume(tmp_path / "b" / "three.mhd", np.zeros((6, 6, 6), np.float32), affine)  # + three.zraw
    write_dicom_series(tmp_path / "c" / "series", np.zeros((6, 6, 5)), affine)
    datalist = folder_datalist(tmp_path, modality="ct", fractions=(1, 0, 0))
    assert datalist["training"] == [
        {"image": str(tmp_path / "a/one.nii.gz"), "modality": "CT"},
        {"image": str(tmp_path / "b/three.mhd"), "modality": "CT"},
        {"image": str(tmp_path / "b/two.mha"), "modality": "CT"},
        {"image": str(tmp_path / "c/series"), "modality": "CT"},
    ]
    assert detect_layout(tmp_path) == "folder"


def test_split_is_reproducible_from_the_seed_whatever_the_input_order():
    items = [{"image": f"/data/{i:02d}.nii.gz"} for i in range(20)]
    first = split_items(items, seed=3)
    assert split_items(list(reversed(items)), seed=3) == first
    assert [len(first[s]) for s in ("training", "validation", "test")] == [14, 2, 4]
    assert split_items(items, seed=4) != first
    assert sorted(all_items(first), key=lambda i: i["image"]) == items


def test_k_folds_cover_the_non_test_items_once_each():
    items = [{"image": f"/data/{i:02d}.nii.gz"} for i in range(20)]
    folds = [split_items(items, seed=0, folds=4, fold=f) for f in range(4)]
    test = folds[0]["test"]
    assert len(test) == 4 and all(f["test"] == test for f in folds)
    validation = [sorted(i["image"] for i in f["validation"]) for f in folds]
    assert sorted(sum(validation, [])) == sorted(i["image"] for i in items if i not in test)
    assert all(len(v) == 4 for v in validation)
    assert all(item["fold"] == 2 for item in folds[2]["validation"])
    assert all(item["fold"] != 2 for item in folds[2]["training"])


def test_split_counts_give_every_requested_part_an_item():
    assert split_counts(10, (0.7, 0.1, 0.2)) == [7, 1, 2]
    assert split_counts(3, (0.7, 0.1, 0.2)) == [1, 1, 1]
    assert split_counts(4, (1, 0, 0)) == [4, 0, 0]
    assert split_counts(7, (0.7, 0.1, 0.2)) == [5, 1, 1]


def test_relative_datalist_loads_back_with_monai(tmp_path):
    items = [
        {"image": str(tmp_path / "data" / f"{i}.nii.gz"), "label": str(tmp_path / "data" / f"{i}_seg.nii.gz")}
        for i in range(4)
    ]
    path = write_datalist(
        split_items(items, fractions=(1, 0, 0)), tmp_path / "lists" / "d.json", relative=True
    )
    stored = json.loads(path.read_text())
    assert stored["training"][0]["image"] == "../data/0.nii.gz"
    loaded = load_decathlon_datalist(path, data_list_key="training", base_dir=tmp_path / "lists")
    assert sorted((i["image"], i["label"]) for i in loaded) == sorted((i["image"], i["label"]) for i in items)


def test_datalist_command_writes_the_built_datalist(tmp_path):
    root = tmp_path / "Dataset042_Lesions"
    make_nnunet(root)
    output = tmp_path / "datalist.json"
    fire.Fire(
        COMMANDS,
        command=["datalist", str(root), "--output", str(output), "--seed", "2", "--fractions", "0.6,0.2,0.2"],
        name="anatomask",
    )
    expected = build_datalist(str(root), layout="nnunet", fractions=(0.6, 0.2, 0.2), seed=2)
    assert json.loads(output.read_text()) == json.loads(json.dumps(expected))
