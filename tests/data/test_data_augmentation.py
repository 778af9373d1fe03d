"""Fine-tuning augmentation: every nnU-Net key reaches the pipeline and changes the crop; crops past the
border and thin slabs are padded with the value the sliding window pads with (0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import (
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
)
from test_data_preprocessing import crop_offset, window

from anatomask_components.bundle_builder import finetune_bundles
from anatomask_components.data.augmentation import (
    NNUNET_AUGMENTATION,
    RandSimulateEnhancementd,
    RandThinSlabd,
    resolve_augmentation,
)
from anatomask_components.data.preprocessing import deterministic_transforms, finetune_train_transforms

ROI = (24, 24, 16)
BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
INTENSITY_KEYS = (
    "noise_prob",
    "blur_prob",
    "brightness_prob",
    "contrast_prob",
    "lowres_prob",
    "gamma_inverted_prob",
    "gamma_prob",
)


def _crops(files, seed: int, **overrides) -> list[dict]:
    settings = {**resolve_augmentation("none"), **overrides}
    pipeline = finetune_train_transforms(
        roi_size=ROI, num_classes=4, num_samples=4, foreground_probability=0.5, augmentation=settings
    )
    pipeline.set_random_state(seed=seed)
    return pipeline(files.item())


def test_reference_values_are_nnunet_defaults():
    """The probabilities and ranges of nnU-Net v2's ``get_training_transforms`` (and mirroring p 0.5)."""
    nnunet = {
        "rotate_prob": 0.2, "rotate_range_deg": 30.0, "scale_prob": 0.2, "scale_range": [0.7, 1.4],
        "flip_prob": 0.5, "noise_prob": 0.1, "noise_variance_max": 0.1, "blur_prob": 0.2,
        "blur_sigma": [0.5, 1.0], "brightness_prob": 0.15, "brightness_range": [0.75, 1.25],
        "contrast_prob": 0.15, "contrast_range": [0.75, 1.25], "lowres_prob": 0.25, "lowres_zoom": [0.5, 1.0],
        "gamma_inverted_prob": 0.1, "gamma_prob": 0.3, "gamma_range": [0.7, 1.5],
    }  # fmt: skip
    assert {k: NNUNET_AUGMENTATION[k] for k in nnunet} == nnunet
    assert NNUNET_AUGMENTATION["enhance_prob"] == 0.0  # not nnU-Net's: off unless asked for
    with pytest.raises(KeyError, match="noise_probability"):
        resolve_augmentation({"noise_probability": 0.5})


@pytest.mark.parametrize("key", INTENSITY_KEYS)
def test_each_intensity_augmentation_changes_the_image_of_the_same_crop(key, tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path, shape=(40, 36, 24))
    plain = _crops(files, seed=5)
    augmented = _crops(files, seed=5, **{key: 1.0})
    for a, b in zip(plain, augmented):
        assert crop_offset(a["image"], a["image"]) == crop_offset(b["image"], a["image"])  # same place
        torch.testing.assert_close(a["label"].as_tensor(), b["label"].as_tensor(), rtol=0, atol=0)
        assert not torch.equal(a["image"].as_tensor(), b["image"].as_tensor()), key


@pytest.mark.parametrize("key", ["rotate_prob", "scale_prob", "flip_prob"])
def test_each_spatial_augmentation_changes_image_and_label_alike(key, tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path, shape=(40, 36, 24))
    reference = deterministic_transforms(label_key="label", num_classes=4)(files.item())
    plain = _crops(files, seed=11)
    augmented = _crops(files, seed=11, **{key: 1.0})
    changed = 0
    for a, b in zip(plain, augmented):
        assert tuple(b["image"].shape) == (1, *ROI) and tuple(b["label"].shape) == (1, *ROI)
        assert set(torch.unique(b["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}
        changed += not torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        if key == "flip_prob":  # flips move the label with the image: it is the flipped window
            offset = crop_offset(a["image"], reference["image"])
            source = window(reference["label"], offset, ROI).as_tensor()
            flipped = b["label"].as_tensor()
            assert any(
                torch.equal(flipped, source.flip(dims))
                for dims in [(1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
            )
    assert changed == len(plain)


def test_crops_reach_past_the_border_padded_with_zero(tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path, shape=(30, 28, 18))
    reference = deterministic_transforms(label_key="label", num_classes=4)(files.item())
    shape = reference["image"].shape[1:]
    outside = 0
    for seed in range(6):
        for crop in _crops(files, seed=seed, border_fraction=0.25):
            offset = crop_offset(crop["image"], reference["image"])
            beyond = [max(0, -o) for o in offset]
            assert all(b <= round(0.25 * r) for b, r in zip(beyond, ROI))
            for axis, (o, s, r) in enumerate(zip(offset, shape, ROI)):
                image = crop["image"].as_tensor().movedim(axis + 1, 1)
                label = crop["label"].as_tensor().movedim(axis + 1, 1)
                pad_before, pad_after = max(0, -o), max(0, o + r - s)
                for part in ([slice(0, pad_before)] if pad_before else []) + (
                    [slice(r - pad_after, r)] if pad_after else []
                ):
                    outside += 1
                    assert torch.all(image[:, part] == 0) and torch.all(label[:, part] == 0)
    assert outside > 0  # some crops did reach past the border


def test_thin_slab_keeps_consecutive_slices_and_pads_the_rest(tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path, shape=(40, 36, 24))
    plain = _crops(files, seed=3)
    slabbed = _crops(files, seed=3, thin_slab_prob=1.0, thin_slab_min_slices=3)
    for a, b in zip(plain, slabbed):
        image, label = b["image"].as_tensor(), b["label"].as_tensor()
        kept = [z for z in range(ROI[2]) if torch.equal(image[..., z], a["image"].as_tensor()[..., z])]
        assert kept == list(range(kept[0], kept[0] + len(kept)))  # one run of consecutive slices
        assert 3 <= len(kept) < ROI[2]
        removed = [z for z in range(ROI[2]) if z not in kept]
        assert torch.all(image[..., removed] == 0) and torch.all(label[..., removed] == 0)
        torch.testing.assert_close(label[..., kept], a["label"].as_tensor()[..., kept], rtol=0, atol=0)


def test_thin_slab_draws_every_thickness_in_its_range():
    transform = RandThinSlabd(["image"], prob=1.0, min_slices=2)
    transform.set_random_state(0)
    thicknesses = set()
    for _ in range(300):
        out = transform({"image": torch.ones(1, 2, 2, 8)})["image"]
        thicknesses.add(int((out[0, 0, 0] != 0).sum()))
    assert thicknesses == set(range(2, 8))


def test_simulated_enhancement_shifts_each_labelled_class_by_its_own_offset():
    label = torch.zeros(1, 6, 6, 4)
    label[0, :3] = 1
    label[0, 3:, :3] = 2
    image = torch.randn(1, 6, 6, 4)
    transform = RandSimulateEnhancementd(["image"], "label", prob=1.0, offset_range=(0.1, 0.5))
    transform.set_random_state(0)
    shift = transform({"image": image, "label": label})["image"] - image
    for value in (1, 2):
        inside = shift[label == value]
        assert torch.allclose(inside, inside[0].expand_as(inside)) and 0.1 <= float(inside[0]) <= 0.5
    assert torch.all(shift[label == 0] == 0)


def test_every_bundle_key_reaches_the_pipeline(tmp_path):
    """``augmentation#<key>`` of the fine-tuning bundles sets the probability and range of its transform."""
    keys = sorted(k for k in NNUNET_AUGMENTATION if k.endswith("_prob"))
    probabilities = {k: round(0.1 + 0.8 * i / len(keys), 3) for i, k in enumerate(keys)}
    for bundle in finetune_bundles():
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        assert parser["augmentation"] == NNUNET_AUGMENTATION  # the reference values, written out
        parser["augmentation"] = {**probabilities, "gamma_range": [0.6, 1.7], "blur_sigma": [0.3, 0.9]}
        parser["fingerprint"] = {"intensity": {"CT": json.loads(json.dumps(_CT_STATS))}}
        parser["train#files"] = []
        parser["bundle_root"] = str(tmp_path / bundle)
        transforms = parser.get_parsed_content("train#preprocessing").transforms
        found = {}
        for t in transforms:
            if isinstance(t, RandAdjustContrastd):
                key = "gamma_inverted_prob" if t.adjuster.invert_image else "gamma_prob"
                assert tuple(t.adjuster.gamma) == (0.6, 1.7)
            elif isinstance(t, RandGaussianSmoothd):
                key = "blur_prob"
                assert tuple(t.rand_smooth.sigma_x) == (0.3, 0.9)
            else:
                key = {
                    RandRotated: "rotate_prob", RandZoomd: "scale_prob", RandGaussianNoised: "noise_prob",
                    RandScaleIntensityd: "brightness_prob", RandScaleIntensityFixedMeand: "contrast_prob",
                    RandSimulateLowResolutiond: "lowres_prob", RandThinSlabd: "thin_slab_prob",
                    RandSimulateEnhancementd: "enhance_prob", RandFlipd: "flip_prob",
                }.get(type(t))  # fmt: skip
            if key is not None:
                found[key] = float(t.prob)
        assert found == pytest.approx(probabilities), bundle


_CT_STATS = {"mean": 40.0, "std": 100.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}
