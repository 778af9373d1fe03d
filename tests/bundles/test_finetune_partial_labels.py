"""A fine-tuning bundle trains on a datalist with a partially labelled scan (``"labelled": ["aorta"]``),
and its ``label_sets`` follow the data MONAI Label puts in ``train#dataset#data``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from finetune_common import configs, workflow
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.losses import DeepSupervisionLoss

from anatomask_components.data.partial_labels import UNLABELLED_BASE
from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.data.writers import write_volume
from anatomask_components.losses import PartialLabelDiceCELoss

BUNDLE = "anatomask_finetune_flare22"
AORTA = 5


def _datalist_with_an_aorta_only_scan(root: Path) -> Path:
    """Two training phantoms, one of them labelled for the aorta only, and a fully labelled validation one."""
    datalist = write_phantom_dataset(
        root, n_cases=3, shape=(32, 32, 32), num_classes=14, fractions=(0.67, 0.33, 0)
    )
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [2, 1, 0]
    partial = datalist["training"][0]
    label = nib.load(partial["label"])
    only_aorta = np.where(np.asarray(label.dataobj) == AORTA, AORTA, 0).astype(np.uint8)
    partial["label"] = str(write_volume(root / "labels" / "aorta_only.nii.gz", only_aorta, label.affine))
    partial["labelled"] = ["aorta"]
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=4))
    return path


@pytest.mark.slow
def test_two_iterations_with_a_partially_labelled_scan(tmp_path):
    datalist = _datalist_with_an_aorta_only_scan(tmp_path / "dataset")
    flow = workflow(
        BUNDLE,
        ["train.json", "small_override.json"],
        "train",
        bundle_root=str(tmp_path / "run"),
        dataset_dir=str(datalist),
    )
    assert flow.parser.get_parsed_content("label_sets") == [[AORTA]]
    loss = flow.parser.get_parsed_content("loss")
    assert isinstance(loss, DeepSupervisionLoss) and isinstance(loss.loss, PartialLabelDiceCELoss)
    trainer = flow.parser.get_parsed_content("train#trainer")
    seen: list[tuple[set[float], float]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.append(
            (set(e.state.output["label"].unique().tolist()), e.state.output["loss"].item())
        ),
    )
    flow.run()
    assert trainer.state.iteration == 2 and len(seen) == 2
    assert all(math.isfinite(value) for _, value in seen)
    # one iteration per scan (shuffled): the aorta-only one holds aorta and codes, the other class ids
    partial, full = sorted(seen, key=lambda s: max(s[0]), reverse=True)
    assert partial[0] <= {float(AORTA), float(UNLABELLED_BASE)} and float(UNLABELLED_BASE) in partial[0]
    assert max(full[0]) < 14
    assert (tmp_path / "run" / "models" / "model.pt").is_file()  # validation ran and saved


def test_label_sets_follow_the_data_monai_label_trains_on(tmp_path):
    """MONAI Label replaces ``train#dataset#data`` with its studies (no ``labelled`` field): ``label_sets``
    reads them, not the datalist of ``dataset_dir`` (which need not exist there)."""
    parser = ConfigParser()
    parser.read_config(str(configs(BUNDLE) / "train.json"))
    parser["bundle_root"] = str(tmp_path)
    parser["dataset_dir"] = str(tmp_path / "missing")
    parser["train#dataset#data"] = [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]
    assert parser.get_parsed_content("label_sets") == []
    assert parser.get_parsed_content("loss").loss.label_sets == []
    parser["train#dataset#data"] = [
        {"image": "b.nii.gz", "label": "b_seg.nii.gz", "labelled": ["aorta", "liver"]}
    ]
    assert parser.get_parsed_content("label_sets", lazy=False) == [[1, AORTA]]
