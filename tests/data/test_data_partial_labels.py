"""Partially labelled training scans: the datalist field ``labelled``, its checks, the table of label sets,
and the unlabelled codes written into the crops, after the crop and never stale from the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from test_data_preprocessing import crop_offset

from anatomask_components.data.datalists import datalist_section
from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.partial_labels import (
    UNLABELLED_BASE,
    EncodeUnlabelledd,
    labelled_classes,
    partial_label_sets,
)
from anatomask_components.data.preprocessing import finetune_train_transforms, finetune_val_transforms
from anatomask_components.data.writers import write_volume

LABELS = {"0": "background", "1": "liver", "2": "aorta", "3": "spleen"}
ROI = (8, 8, 8)


def test_names_and_ids_give_sorted_class_ids_and_a_complete_list_is_full():
    assert labelled_classes({"image": "a.nii.gz"}, LABELS) is None
    assert labelled_classes({"image": "a.nii.gz", "labelled": ["spleen", 2, "spleen"]}, LABELS) == (2, 3)
    assert labelled_classes({"image": "a.nii.gz", "labelled": [3, "liver", "aorta"]}, LABELS) is None
    assert labelled_classes({"labelled": ["aorta"]}, ["background", "liver", "aorta"]) == (2,)


@pytest.mark.parametrize(
    ("labelled", "message"),
    [
        (["aorat"], r"lists 'aorat', not a class of this model \(did you mean 'aorta'\?\); the classes are "),
        (
            [4],
            r"lists 4, not a class of this model; the classes are 'liver', 'aorta', 'spleen', or their ids "
            r"1\.\.3",
        ),
        (["background"], "the background is never listed"),
        ([0, 1], "the background is never listed"),
        ([True], "lists True, not a class"),
        ([], "must be a non-empty list"),
        ("aorta", "must be a non-empty list"),
    ],
)
def test_bad_fields_name_the_image_and_the_entry(labelled, message):
    with pytest.raises(ValueError, match=message) as error:
        labelled_classes({"image": "/data/cta_07.nii.gz", "labelled": labelled}, LABELS)
    assert str(error.value).startswith("item /data/cta_07.nii.gz: 'labelled' ")


def test_the_table_holds_each_partial_set_once_in_sorted_order():
    files = [
        {"image": "a", "labelled": ["spleen"]},
        {"image": "b"},
        {"image": "c", "labelled": ["aorta", "liver"]},
        {"image": "d", "labelled": [3]},
        {"image": "e", "labelled": ["liver", "aorta", "spleen"]},  # every class: fully labelled
    ]
    assert partial_label_sets(files, LABELS) == [[1, 2], [3]]
    assert partial_label_sets(files[1:2], LABELS) == []
    many = {str(i): f"c{i}" for i in range(130)}
    with pytest.raises(ValueError, match="at most 128 classes"):
        partial_label_sets([{"image": "a", "labelled": ["c1"]}], many)
    assert partial_label_sets([{"image": "a"}], many) == []
    sets = [{"image": str(i), "labelled": [f"c{i}"]} for i in range(1, 128)] + [
        {"image": "x", "labelled": [1, 2]}
    ]
    with pytest.raises(ValueError, match="128 distinct sets of labelled classes; at most 127"):
        partial_label_sets(sets, {"0": "background", **{str(i): f"c{i}" for i in range(1, 128)}})


def _datalist(tmp_path, training, validation=()):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": list(training), "validation": list(validation)}))
    return path


def test_datalist_sections_check_the_field_and_refuse_partial_items_outside_training(tmp_path):
    partial = {"image": "images/cta.nii.gz", "label": "labels/cta.nii.gz", "labelled": ["aorta"]}
    full = {"image": "images/ct.nii.gz", "label": "labels/ct.nii.gz"}
    listed = {**full, "image": "images/all.nii.gz", "labelled": ["liver", "aorta", "spleen"]}
    path = _datalist(tmp_path, [partial, full], [full, listed])
    items = datalist_section(path, "training", require_labels=True, labels=LABELS)
    assert items[0]["labelled"] == ["aorta"] and "labelled" not in items[1]
    assert len(datalist_section(path, "validation", require_labels=True, labels=LABELS)) == 2
    (tmp_path / "aorta").mkdir()  # MONAI reads a string naming a file beside the datalist as its path
    assert datalist_section(path, "training", labels=LABELS)[0]["labelled"] == ["aorta"]

    path = _datalist(tmp_path, [full], [partial])
    with pytest.raises(ValueError) as error:
        datalist_section(path, "validation", require_labels=True, labels=LABELS)
    assert str(error.value) == (
        f"{path}: validation item {tmp_path / 'images' / 'cta.nii.gz'} is partially labelled ('labelled': "
        "['aorta']); validation scores need every class labelled: move it to 'training' or label every class"
    )
    assert len(datalist_section(path, "validation")) == 1  # without labels nothing is checked

    path = _datalist(tmp_path, [{**partial, "labelled": ["aorta", "kidney"]}])
    with pytest.raises(
        ValueError, match=rf"^{path}: training item .*cta.nii.gz: 'labelled' lists 'kidney', "
    ):
        datalist_section(path, "training", labels=LABELS)


def _phantom_label(shape=(28, 24, 16)) -> np.ndarray:
    """Three box organs: 1 and 3 large, the labelled 2 small and off-centre."""
    label = np.zeros(shape, dtype=np.uint8)
    label[2:12, 2:20, 2:14] = 1
    label[20:24, 16:20, 10:14] = 2
    label[14:26, 2:10, 2:8] = 3
    return label


def _write_case(folder, label: np.ndarray, seed: int = 0) -> dict:
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image = np.random.default_rng(seed).normal(40.0, 20.0, label.shape).astype(np.float32)
    image[label > 0] += 100.0 * label[label > 0]
    return {
        "image": str(write_volume(folder / "image.nii.gz", image, affine)),
        "label": str(write_volume(folder / "label.nii.gz", label, affine)),
    }


def test_the_encoding_marks_every_voxel_outside_the_labelled_classes():
    label = torch.tensor(_phantom_label()[None], dtype=torch.float32)
    encode = EncodeUnlabelledd("label", [[1, 2], [2]], LABELS)
    out = encode({"label": label, "labelled": ["aorta"], "image": "x"})
    assert "labelled" not in out
    assert torch.equal(out["label"] == 2, label == 2)
    assert torch.all(out["label"][label != 2] == UNLABELLED_BASE + 1)
    out = encode({"label": label, "labelled": [2, "liver"], "image": "x"})
    assert torch.equal(out["label"], torch.where((label == 1) | (label == 2), label, UNLABELLED_BASE))
    unchanged = encode({"label": label, "image": "x"})
    assert unchanged["label"] is label
    assert encode({"label": label, "labelled": [1, 2, 3], "image": "x"})["label"] is label
    with pytest.raises(ValueError, match=r"item x: its labelled classes \[3\] are not in label_sets"):
        encode({"label": label, "labelled": ["spleen"], "image": "x"})
    with pytest.raises(ValueError, match="got no labels"):
        EncodeUnlabelledd("label")({"label": label, "labelled": ["aorta"], "image": "x"})


def test_without_the_field_the_pipeline_gives_the_same_crops_bit_for_bit(tmp_path):
    item = _write_case(tmp_path, _phantom_label())
    settings = {"roi_size": ROI, "num_classes": 4, "num_samples": 3, "foreground_probability": 0.5}
    pipeline = finetune_train_transforms(**settings, labels=LABELS, label_sets=[[2]])
    assert isinstance(pipeline.transforms[-1], EncodeUnlabelledd)
    without = Compose(finetune_train_transforms(**settings).transforms[:-1])
    for seed in range(3):
        pipeline.set_random_state(seed=seed)
        without.set_random_state(seed=seed)
        for ours, reference in zip(pipeline(dict(item)), without(dict(item)), strict=True):
            assert ours.keys() == reference.keys()
            for key in ("image", "label"):
                assert torch.equal(ours[key].as_tensor(), reference[key].as_tensor())
                torch.testing.assert_close(ours[key].affine, reference[key].affine, rtol=0, atol=0)


def test_positive_crops_centre_on_the_labelled_organ(tmp_path):
    """The crop sees the raw label map (encoded afterwards), so a positive crop of an aorta-only scan is
    centred on the aorta, not on the unlabelled codes around it."""
    raw = _phantom_label()
    only_aorta = np.where(raw == 2, 2, 0).astype(np.uint8)
    item = {**_write_case(tmp_path, only_aorta), "labelled": ["aorta"]}
    reference = finetune_val_transforms(num_classes=4)(dict(item))["label"]
    pipeline = finetune_train_transforms(
        roi_size=ROI,
        num_classes=4,
        num_samples=8,
        foreground_probability=1.0,
        augmentation="none",
        labels=LABELS,
        label_sets=[[1], [2]],
    )
    pipeline.set_random_state(seed=0)
    for crop in pipeline(item):
        assert "labelled" not in crop
        assert set(crop["label"].unique().tolist()) == {2.0, UNLABELLED_BASE + 1.0}
        offset = crop_offset(crop["label"], reference)
        window = reference[(0, *[slice(o, o + s) for o, s in zip(offset, ROI)])]
        assert (window == 2).any()
        # MONAI moves a centre near the border until the crop fits; elsewhere it is the chosen voxel
        if all(0 < o < n - s for o, s, n in zip(offset, ROI, reference.shape[1:])):
            assert reference[(0, *[o + s // 2 for o, s in zip(offset, ROI)])] == 2


def test_a_changed_field_is_never_read_stale_from_the_cache(tmp_path):
    """The cache key covers every item field (not only its files), so the same files with another
    ``labelled`` list are another entry, and the encoding follows the field of the current item."""
    item = _write_case(tmp_path / "case", _phantom_label())
    cache = tmp_path / "cache"
    sets = [[1], [2]]
    pipeline = finetune_train_transforms(
        roi_size=ROI, num_classes=4, num_samples=2, augmentation="none", labels=LABELS, label_sets=sets
    )
    keys = []
    for labelled, kept, code in (
        (["liver"], 1, UNLABELLED_BASE),
        (["aorta"], 2, UNLABELLED_BASE + 1),
        (None,) * 3,
    ):
        current = {**item, "labelled": labelled} if labelled else dict(item)
        for _ in range(2):  # the second dataset reads what the first one cached
            dataset = CachedScanDataset([current], pipeline, cache)
            values = set().union(*(crop["label"].unique().tolist() for crop in dataset[0]))
            assert values <= ({float(kept), float(code)} if labelled else {0.0, 1.0, 2.0, 3.0})
            assert code is None or float(code) in values
            assert dataset.cache_path(0).is_file()
        keys.append(dataset.cache_key(0))
    assert len(set(keys)) == 3
