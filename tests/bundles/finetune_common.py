"""Shared steps of the fine-tuning bundle tests: run the workflows in-process and check their outputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from packaging.specifiers import SpecifierSet

from anatomask_components.checkpointing import atomic_save
from anatomask_components.data.readers import read_volume
from anatomask_components.handlers import PretrainedWeightsLoader
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.networks.stunet import stunet_preset
from anatomask_components.weights import STUNET_INPUT_CONV_KEYS

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
# The small-model override's network: the pretraining bundle's small network, so its encoder export fits.
TINY = stunet_preset("tiny")  # depths [1] * 5, widths 8-64, strides [2,2,2] x 3 + [1,1,1]
TINY_TENSORS = 106  # 5 context stages x 10, 4 upsamplings x 2, 4 localization stages x 10, 4 heads x 2
CSV_HEADER = ["case", "label", "name", "dsc", "nsd", "tolerance_mm", "reference_voxels", "predicted_voxels"]


def configs(bundle: str) -> Path:
    return BUNDLES / bundle / "configs"


def workflow(bundle: str, names: list[str], workflow_type: str, **overrides: Any) -> ConfigWorkflow:
    """An initialised ConfigWorkflow of ``configs/<names>`` with overrides."""
    folder = configs(bundle)
    flow = ConfigWorkflow(
        config_file=[str(folder / name) for name in names],
        workflow_type=workflow_type,
        meta_file=str(folder / "metadata.json"),
        logging_file=str(folder / "logging.conf"),
        **overrides,
    )
    flow.initialize()
    return flow


METADATA_FIELDS = {
    "schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
    "required_packages_version", "task", "description", "authors", "copyright", "data_source", "data_type",
    "image_classes", "label_classes", "pred_classes", "eval_metrics", "intended_use", "references",
    "network_data_format",
}  # fmt: skip
TENSOR_FIELDS = {
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
    "channel_def",
}  # fmt: skip


def check_metadata(bundle: str) -> dict[str, Any]:
    """The Model Zoo fields are present (the schema cannot be downloaded here) and consistent."""
    metadata = json.loads((configs(bundle) / "metadata.json").read_text())
    assert METADATA_FIELDS <= set(metadata)
    assert metadata["version"] in metadata["changelog"]
    # version ranges (tests/bundles/test_metadata.py checks them all); this package's must admit its version
    assert SpecifierSet(metadata["required_packages_version"]["anatomask-components"]).contains("0.1.0")
    assert metadata["eval_metrics"] == {} or all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metadata["eval_metrics"].values()
    )
    data_format = metadata["network_data_format"]
    assert list(data_format["inputs"]) == ["image"] and list(data_format["outputs"]) == ["pred"]
    for tensor in (data_format["inputs"]["image"], data_format["outputs"]["pred"]):
        assert TENSOR_FIELDS <= set(tensor)
        assert tensor["num_channels"] == len(tensor["channel_def"])
    train_config = json.loads((configs(bundle) / "train.json").read_text())
    assert data_format["inputs"]["image"]["num_channels"] == train_config["in_channels"]
    assert data_format["outputs"]["pred"]["spatial_shape"] == train_config["roi_size"]
    return metadata


def labels_of(bundle: str) -> dict[str, str]:
    return json.loads((configs(bundle) / "train.json").read_text())["labels"]


def encoder_export(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The pretraining bundle's ``models/encoder.pt`` of its small network (1 channel)."""
    torch.manual_seed(seed)
    encoder = AnatoMaskPretrainModel(STUNet(1, 1, **TINY)).encoder_state_dict()
    atomic_save(encoder, path)
    return encoder


def train(bundle: str, root: Path, datalist: Path, pretrained: Path) -> dict[str, Any]:
    """Two training iterations with the small-model override; returns what the tests check."""
    flow = workflow(
        bundle,
        ["train.json", "small_override.json"],
        "train",
        bundle_root=str(root),
        dataset_dir=str(datalist),
        pretrained_weights=str(pretrained),
    )
    trainer = flow.parser.get_parsed_content("train#trainer")
    network = flow.parser.get_parsed_content("network")
    after_loading: dict[str, torch.Tensor] = {}
    losses: list[float] = []
    # attached after the bundle's own STARTED handlers (weights loader, resume), so it sees their result
    trainer.add_event_handler(
        Events.STARTED,
        lambda _: after_loading.update({k: v.clone() for k, v in network.state_dict().items()}),
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].detach().item())
    )
    flow.run()
    (loader,) = [
        h for h in flow.parser.get_parsed_content("train#handlers") if isinstance(h, PretrainedWeightsLoader)
    ]
    return {
        "trainer": trainer,
        "network": network,
        "report": loader.report,
        "after_loading": after_loading,
        "losses": losses,
        "model_path": Path(flow.parser.get_parsed_content("model_path")),
    }


def check_training(result: dict[str, Any], encoder: dict[str, torch.Tensor], in_channels: int) -> None:
    """Two iterations ran, the encoder export was loaded as documented, and model.pt is a flat state dict."""
    assert result["trainer"].state.iteration == 2 and result["trainer"].state.epoch == 1
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    report = result["report"]
    assert report.num_network_tensors == TINY_TENSORS
    assert report.num_transferred == 50 and len(report.missing) == TINY_TENSORS - 50
    assert not report.shape_mismatch and report.unused == []
    adapted = set(STUNET_INPUT_CONV_KEYS) if in_channels != 1 else set()
    assert set(report.adapted) == adapted and len(report.loaded) == 50 - len(adapted)
    state = result["after_loading"]
    for key, value in encoder.items():
        if key in adapted:
            expected = (value / in_channels).expand(-1, in_channels, *value.shape[2:])
            assert torch.equal(state[key], expected), key
        else:
            assert torch.equal(state[key], value), key
    saved = torch.load(result["model_path"], weights_only=True)
    network = result["network"]
    assert list(saved) == list(network.state_dict())
    STUNet(in_channels, network.out_channels, **TINY).load_state_dict(saved, strict=True)


def evaluate(bundle: str, root: Path, datalist: Path, model_path: Path, **overrides: Any) -> Path:
    output_dir = root / "eval"
    flow = workflow(
        bundle,
        ["train.json", "evaluate.json", "small_override.json"],
        "train",
        bundle_root=str(root),
        dataset_dir=str(datalist),
        model_path=str(model_path),
        output_dir=str(output_dir),
        **overrides,
    )
    flow.run()
    return output_dir


def check_metrics(output_dir: Path, cases: list[str], labels: dict[str, str], extra_columns=()) -> list[dict]:
    """One metrics row per case and foreground class, scores in [0, 1] (NaN only when both are empty)."""
    with open(output_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_HEADER + list(extra_columns)
    summary = json.loads((output_dir / "summary.json").read_text())
    foreground = {int(k): v for k, v in labels.items() if k != "0"}
    assert [(r["case"], int(r["label"])) for r in rows] == [(c, k) for c in cases for k in foreground]
    for row in rows:
        assert row["name"] == foreground[int(row["label"])]
        both_empty = row["reference_voxels"] == "0" and row["predicted_voxels"] == "0"
        for metric in ("dsc", "nsd"):
            if both_empty:
                assert row[metric] == ""
            else:
                assert 0.0 <= float(row[metric]) <= 1.0
        assert float(row["tolerance_mm"]) == 1.0
    assert summary["num_cases"] == len(cases)
    assert list(summary["classes"]) == list(foreground.values())
    for entry in [*summary["classes"].values(), summary["per_case_mean"]]:
        for metric in ("dsc", "nsd"):
            stats = entry[metric]
            assert stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0
    return rows


def infer(bundle: str, root: Path, source: Path, model_path: Path, **overrides: Any) -> Path:
    output_dir = root / "predictions"
    flow = workflow(
        bundle,
        ["inference.json", "small_override.json"],
        "infer",
        bundle_root=str(root),
        dataset_dir=str(source),
        model_path=str(model_path),
        output_dir=str(output_dir),
        **overrides,
    )
    flow.run()
    return output_dir


def check_same_geometry(scan: Path, label_map: Path, num_classes: int) -> np.ndarray:
    """The label map has the scan's shape and affine (as the data layer reads the scan) and valid ids."""
    array, affine, _ = read_volume(scan)
    written = nib.load(label_map)
    assert written.shape == array.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    assert written.get_data_dtype() == np.uint8
    labels = np.asarray(written.dataobj)
    assert labels.min() >= 0 and labels.max() < num_classes
    return labels
