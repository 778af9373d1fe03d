"""Label remapping: TotalSegmentator ids to FLARE22 / AMOS22, unmapped ids to background."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from anatomask_components.bundle_builder import DATASET_FOLDER, finetune_bundles
from anatomask_components.data.labels import LABEL_MAPPINGS, LABEL_SETS, RemapLabelsd, load_label_mapping
from anatomask_components.data.preprocessing import finetune_val_transforms
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.data.writers import write_volume

# Written out by hand from the challenges' label orders and TotalSegmentator's class map (source ids),
# so a slip in either table shows up here.
FLARE22_FROM_TOTALSEG = {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}
AMOS22_FROM_TOTALSEG = {
    1: 1,
    2: 2,
    3: 3,
    4: 4,
    15: 5,
    5: 6,
    6: 7,
    52: 8,
    63: 9,
    7: 10,
    8: 11,
    9: 12,
    19: 13,
    21: 14,
    22: 15,
}
# TotalSegmentator's total_mr task: esophagus 12, duodenum 14, bladder 16, prostate 17, aorta 23, IVC 24
AMOS22_FROM_TOTALSEG_MR = {
    1: 1,
    2: 2,
    3: 3,
    4: 4,
    12: 5,
    5: 6,
    6: 7,
    23: 8,
    24: 9,
    7: 10,
    8: 11,
    9: 12,
    14: 13,
    16: 14,
    17: 15,
}


def test_shipped_mappings_match_the_label_sets():
    assert LABEL_MAPPINGS["totalseg_to_flare22"] == FLARE22_FROM_TOTALSEG
    assert LABEL_MAPPINGS["totalseg_to_amos22"] == AMOS22_FROM_TOTALSEG
    assert LABEL_MAPPINGS["totalseg_mr_to_amos22"] == AMOS22_FROM_TOTALSEG_MR


# TotalSegmentator's names of the bundles' labels that are not "<side> <organ>" -> "<organ>_<side>"
TOTALSEG_NAMES = {
    "postcava": "inferior_vena_cava",
    "bladder": "urinary_bladder",
    "prostate/uterus": "prostate",
}


def _totalseg_name(label: str) -> str:
    words = label.split()
    if words[0] in ("left", "right"):
        words = words[1:] + words[:1]
    return TOTALSEG_NAMES.get(label, "_".join(words))


@pytest.mark.parametrize("label_set", sorted(LABEL_SETS))
def test_remapping_targets_are_the_bundles_labels(label_set):
    """The remapping tables (in the package, for installs without the repository's bundles) send each
    TotalSegmentator structure to the id that the bundle's spec.json gives that structure."""
    folder = finetune_bundles()[f"anatomask_finetune_{label_set}"]
    labels = json.loads((folder / DATASET_FOLDER / "spec.json").read_text())["labels"]
    assert ["background", *LABEL_SETS[label_set]] == [
        labels["0"],
        *(_totalseg_name(labels[str(i)]) for i in range(1, len(labels))),
    ]


def test_remap_transform_on_a_generated_label_map_sends_unmapped_ids_to_background():
    rng = np.random.default_rng(0)
    source_ids = np.array([0, 1, 2, 5, 7, 15, 20, 52, 63, 99, 117])
    label = rng.choice(source_ids, size=(1, 12, 10, 8)).astype(np.float32)
    affine = torch.diag(torch.tensor([1.5, -1.5, 2.0, 1.0], dtype=torch.float64))
    remapped = RemapLabelsd("label", "totalseg_to_flare22")({"label": MetaTensor(label, affine=affine)})[
        "label"
    ]
    expected = np.vectorize(lambda v: FLARE22_FROM_TOTALSEG.get(int(v), 0))(label)
    np.testing.assert_array_equal(remapped.numpy(), expected)
    assert remapped.dtype == torch.float32 and isinstance(remapped, MetaTensor)
    torch.testing.assert_close(remapped.affine, affine)
    assert set(np.unique(remapped.numpy())) == {0, 1, 2, 3, 4, 5, 6, 10}


def test_mapping_from_a_json_file_with_string_keys(tmp_path):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps({"3": 1, "9": 2}))
    assert load_label_mapping(path) == {3: 1, 9: 2}
    out = RemapLabelsd("label", str(path))({"label": torch.tensor([[0.0, 3.0, 9.0, 4.0]])})["label"]
    assert out.tolist() == [[0.0, 1.0, 2.0, 0.0]]


def test_non_integer_labels_cannot_be_remapped():
    with pytest.raises(InvalidScanError, match="negative or non-integer"):
        RemapLabelsd("label", {1: 1})({"label": torch.tensor([0.0, 0.5])})


def test_remapping_inside_the_shared_preprocessing_then_checks_the_target_label_set(tmp_path, phantom):
    label = (phantom.label * 10 + (phantom.label > 0) * 2).astype(np.int16)  # organs become 12, 22, 32
    label_path = write_volume(tmp_path / "ts.nii.gz", label, phantom.affine)
    out = finetune_val_transforms(spacing=None, label_mapping={12: 1, 32: 3}, num_classes=4)(
        {"image": str(phantom.image_path), "label": str(label_path)}
    )
    reference = finetune_val_transforms(spacing=None)(phantom.item())["label"].numpy()
    np.testing.assert_array_equal(out["label"].numpy(), np.where(reference == 2, 0, reference))
