"""One source of truth for the training length, and multi-node device binding.

MONAI Label's bundle training task overrides ``train#trainer#max_epochs`` (50 by default), not the
bundle's own ``max_epochs`` key. Every schedule whose length depends on the number of epochs (the
learning-rate schedule and its warm-up, the hard-ratio schedule, the EMA momentum warm-up) must follow
whichever of the two is overridden.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser

from anatomask_components.bundle_builder import finetune_bundles
from anatomask_components.data.phantoms import write_phantom_dataset

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
PRETRAIN = "anatomask_pretrain"
FINETUNE = list(finetune_bundles())
EPOCHS = 7
# None: the configs' own length; otherwise the key MONAI Label overrides, or the bundle's top-level key
OVERRIDES = [None, "train#trainer#max_epochs", "max_epochs"]
OVERRIDE_IDS = ["own_length", "trainer_override", "max_epochs_override"]


def _parser(bundle: str, names: list[str], override: str | None, epochs: int = EPOCHS, **extra: Any):
    folder = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_meta(str(folder / "metadata.json"))
    parser.read_config([str(folder / name) for name in names])
    parser.update({**extra, **({override: epochs} if override else {})})
    parser.parse()
    return parser


def _expected_epochs(parser: ConfigParser, override: str | None, epochs: int = EPOCHS) -> int:
    return epochs if override else parser["max_epochs"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schedule_scans")
    write_phantom_dataset(root, n_cases=3, shape=(40, 40, 44), layout="folder", seed=3)
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schedule_labelled")
    write_phantom_dataset(root, n_cases=3, shape=(40, 40, 40), num_classes=14, fractions=(0.34, 0.33, 0.33))
    return root / "datalist.json"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}#{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}#{index}")
    else:
        yield path, node


@pytest.mark.parametrize("bundle", [PRETRAIN, *FINETUNE])
def test_only_the_trainer_reads_max_epochs(bundle):
    """``@max_epochs`` is read by ``train#trainer#max_epochs`` alone; everything else reads the trainer's."""
    for config in sorted((BUNDLES / bundle / "configs").glob("*.json")):
        if config.name == "metadata.json":
            continue
        readers = [
            path
            for path, value in _walk(json.loads(config.read_text()))
            if isinstance(value, str) and "@max_epochs" in value
        ]
        expected = ["train#trainer#max_epochs"] if config.name == "train.json" else []
        assert readers == expected, config
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    assert train["train"]["trainer"]["max_epochs"] == "@max_epochs"


@pytest.mark.parametrize("override", OVERRIDES, ids=OVERRIDE_IDS)
def test_pretraining_schedules_follow_the_trainer(override, scans, tmp_path):
    parser = _parser(
        PRETRAIN,
        ["train.json", "small_override.json"],
        override,
        bundle_root=str(tmp_path),
        dataset_dir=str(scans),
        batch_size=1,
    )
    epochs = _expected_epochs(parser, override)
    steps = len(parser.get_parsed_content("train#dataloader"))
    assert steps == 3
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == epochs
    scheduler = parser.get_parsed_content("train#lr_scheduler")
    assert scheduler.t_total == epochs * steps
    assert scheduler.warmup_steps == round(parser.get_parsed_content("warmup_fraction") * epochs * steps)
    assert parser.get_parsed_content("hard_ratio_schedule").total_epochs == epochs
    # hard ratio: r_0 at the first epoch, r_T at the last (Eq. 3 with T = the trainer's epochs)
    schedule = parser.get_parsed_content("hard_ratio_schedule")
    assert schedule(0) == parser["hard_ratio_start"] and schedule(epochs) == parser["hard_ratio_end"]
    # the EMA teacher reads engine.state.max_epochs: its warm-up ends at a quarter of the trainer's epochs
    teacher = parser.get_parsed_content("teacher")
    warmup = teacher.warmup_fraction * trainer.state.max_epochs
    assert teacher.momentum(warmup, trainer.state.max_epochs) == pytest.approx(teacher.momentum_end)
    assert teacher.momentum(0.5 * warmup, trainer.state.max_epochs) < teacher.momentum_end


@pytest.mark.parametrize("override", OVERRIDES, ids=OVERRIDE_IDS)
@pytest.mark.parametrize(
    "names",
    [
        ["train.json", "multi_gpu_train.json", "small_override.json"],
        ["train.json", "train_selfmedhpm.json"],
        ["train.json"],
    ],
)
def test_pretraining_variants_still_merge(names, override, scans, tmp_path):
    """The expressions of the schedules resolve in every merge (without building DDP or the ViT)."""
    parser = _parser(PRETRAIN, names, override, bundle_root=str(tmp_path), dataset_dir=str(scans))
    epochs = _expected_epochs(parser, override)
    steps = len(parser.get_parsed_content("train#dataloader"))
    assert parser.get_parsed_content("train#trainer#max_epochs") == epochs
    assert parser.get_parsed_content("train#lr_scheduler#t_total") == epochs * steps
    warmup = parser.get_parsed_content("train#lr_scheduler#warmup_steps")
    assert warmup == round(parser.get_parsed_content("warmup_fraction") * epochs * steps)
    assert parser.get_parsed_content("hard_ratio_schedule#total_epochs") == epochs
    if "train_selfmedhpm.json" in names:  # SelfMedHPM: EMA warm-up over a fixed number of epochs
        fraction = min(1.0, parser["ema_warmup_epochs"] / epochs)
        assert parser.get_parsed_content("ema_warmup_fraction") == pytest.approx(fraction)


def test_selfmedhpm_ema_warmup_follows_the_trainer(scans, tmp_path):
    parser = _parser(
        PRETRAIN,
        ["train.json", "train_selfmedhpm.json"],
        "train#trainer#max_epochs",
        epochs=400,
        bundle_root=str(tmp_path),
        dataset_dir=str(scans),
    )
    assert parser.get_parsed_content("ema_warmup_fraction") == pytest.approx(100 / 400)


@pytest.mark.parametrize("override", OVERRIDES, ids=OVERRIDE_IDS)
@pytest.mark.parametrize("bundle", FINETUNE)
def test_finetuning_cosine_schedule_follows_the_trainer(bundle, override, labelled, tmp_path):
    parser = _parser(
        bundle,
        ["train.json", "small_override.json"],
        override,
        bundle_root=str(tmp_path),
        dataset_dir=str(labelled),
    )
    epochs = _expected_epochs(parser, override)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == epochs
    scheduler = parser.get_parsed_content("train#lr_scheduler")
    assert scheduler.T_max == epochs * trainer.state.epoch_length == epochs * parser["iterations_per_epoch"]


@pytest.mark.parametrize("override", OVERRIDES, ids=OVERRIDE_IDS)
@pytest.mark.parametrize(
    "names",
    [
        ["train.json"],
        ["train.json", "multi_gpu_train.json", "small_override.json"],
        ["train.json", "evaluate.json", "small_override.json"],
        ["train.json", "small_override.json", "unetr_override.json"],
    ],
)
@pytest.mark.parametrize("bundle", FINETUNE)
def test_finetuning_variants_still_merge(bundle, names, override, labelled, tmp_path):
    parser = _parser(bundle, names, override, bundle_root=str(tmp_path), dataset_dir=str(labelled))
    epochs = _expected_epochs(parser, override)
    assert parser.get_parsed_content("train#trainer#max_epochs") == epochs
    t_max = parser.get_parsed_content("train#lr_scheduler#T_max")
    assert t_max == epochs * parser.get_parsed_content("iterations_per_epoch")


@pytest.mark.parametrize("bundle", [PRETRAIN, *FINETUNE])
def test_multi_gpu_device_reads_local_rank(bundle, monkeypatch):
    """On several nodes the global rank exceeds the GPUs of a node: the device index is LOCAL_RANK."""
    config = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
    assert "LOCAL_RANK" in config["device"] and "get_rank" not in config["device"]
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parser = ConfigParser({"imports": config["imports"], "device": config["device"]})
    assert parser.get_parsed_content("device") == torch.device("cuda:1")
