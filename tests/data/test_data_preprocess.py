"""``anatomask preprocess``: the cache filled ahead of training from a bundle's own config, bad scans listed,
and a training run afterwards that computes nothing new."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

import anatomask_components.data.readers as readers
from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.data.preprocess import bundle_datasets, fill_cache

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
PRETRAIN_CONFIGS = BUNDLES / "anatomask_pretrain" / "configs"
SMALL = PRETRAIN_CONFIGS / "small_override.json"
ANATOMASK = Path(sys.executable).parent / "anatomask"


@pytest.fixture
def scans_with_a_bad_one(tmp_path) -> Path:
    root = tmp_path / "scans"
    write_phantom_dataset(root, n_cases=3, shape=(40, 40, 44), layout="folder", seed=3)
    (root / "broken.nii.gz").write_bytes(b"not a NIfTI file at all")
    return root


def _cache_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix in (".pt", ".invalid")}


@pytest.mark.slow
def test_preprocess_lists_the_bad_scan_and_the_run_afterwards_computes_nothing(
    tmp_path, scans_with_a_bad_one, monkeypatch
):
    cache, root = tmp_path / "cache", tmp_path / "bundle_root"
    command = [
        str(ANATOMASK), "preprocess", str(scans_with_a_bad_one), "--bundle", "anatomask_pretrain",
        "--config_file", str(SMALL), "--bundle_root", str(root), "--cache_dir", str(cache), "--workers", "2",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    summary = [line for line in done.stdout.splitlines() if line.startswith("[preprocess] 4 scans")]
    assert len(summary) == 1, done.stdout
    assert "3 computed, 0 already cached, 1 bad" in summary[0] and "scans/s with 2 workers" in summary[0]
    bad_lines = [line for line in done.stdout.splitlines() if line.startswith("  bad scan")]
    assert len(bad_lines) == 1 and "broken.nii.gz: cannot be read" in bad_lines[0]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "anatomask preprocess: error: 1 of 4 scans are bad (listed above)"
    files = _cache_files(cache)
    assert sum(name.endswith(".pt") for name in files) == 3
    assert sum(name.endswith(".invalid") for name in files) == 1  # the pretraining policy marks it
    written = sum((cache / name).stat().st_size for name in files if name.endswith(".pt"))
    assert (
        f"{written / 2**10:.1f} KB written" in summary[0] or f"{written / 2**20:.1f} MB written" in summary[0]
    )

    # the same bundle's run over the same folder: nothing read, nothing written
    reads = []
    original = readers.read_volume
    monkeypatch.setattr(readers, "read_volume", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    workflow = ConfigWorkflow(
        config_file=[str(PRETRAIN_CONFIGS / "train.json"), str(SMALL)],
        workflow_type="train",
        meta_file=str(PRETRAIN_CONFIGS / "metadata.json"),
        logging_file=str(PRETRAIN_CONFIGS / "logging.conf"),
        bundle_root=str(root),
        dataset_dir=str(scans_with_a_bad_one),
        cache_dir=str(cache),
        max_epochs=1,
        batch_size=1,
    )
    workflow.initialize()
    workflow.run()
    assert workflow.parser.get_parsed_content("train#trainer").state.iteration == 4
    assert reads == []  # fingerprint found beside the model, every volume and the bad-scan marker cached
    assert _cache_files(cache).keys() == files.keys()


@pytest.mark.slow
def test_fine_tuning_settings_fill_training_and_validation(tmp_path, capsys):
    datalist = write_phantom_dataset(tmp_path / "data", n_cases=4, shape=(36, 36, 30), num_classes=5)
    path = tmp_path / "data" / "datalist.json"
    sections = {name: len(datalist.get(name) or []) for name in ("training", "validation")}
    root, cache = tmp_path / "root", tmp_path / "cache"
    datasets = bundle_datasets("anatomask_finetune_flare22", path, "finetune", root, cache_dir=cache)
    assert [label for label, _ in datasets] == [
        "anatomask_finetune_flare22 train#dataset",
        "anatomask_finetune_flare22 validate#dataset",
    ]
    assert [len(d) for _, d in datasets] == [sections["training"], sections["validation"]]
    first = fill_cache(datasets, workers=0)
    total = sum(sections.values())
    assert (first["computed"], first["cached"], first["bad"]) == (total, 0, [])
    assert first["bytes_written"] == sum(p.stat().st_size for p in cache.glob("*.pt"))
    # a new parse of the bundle (as the run does) finds everything cached
    again = fill_cache(bundle_datasets("anatomask_finetune_flare22", path, "both", root, cache_dir=cache), 0)
    assert (again["computed"], again["cached"], again["bytes_written"]) == (0, total, 0)
    assert bundle_datasets("anatomask_finetune_flare22", path, "pretrain", root, cache_dir=cache) == []


def test_an_unknown_bundle_or_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_bundle: not a bundle folder"):
        bundle_datasets("no_such_bundle", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json: no such datalist or dataset folder"):
        bundle_datasets("anatomask_pretrain", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="stage must be one of"):
        bundle_datasets("anatomask_pretrain", tmp_path, stage="train")


def test_the_cache_command_lists_and_prunes(tmp_path):
    from anatomask_components.data.cache import cache_command
    from anatomask_components.data.datasets import CachedScanDataset
    from anatomask_components.data.preprocessing import inference_transforms

    data = write_phantom_dataset(tmp_path / "d", n_cases=2, shape=(20, 20, 12), layout="folder")
    items = [{"image": item["image"]} for item in data["training"] + data.get("validation", [])]
    dataset = CachedScanDataset(items, inference_transforms(), tmp_path / "c", name="phantoms")
    for index in range(len(dataset)):
        dataset[index]
    env = {**os.environ, "ANATOMASK_PREPROCESSED_CACHE": str(tmp_path / "c")}
    listing = subprocess.run([str(ANATOMASK), "cache"], capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if "phantoms" in line)
    assert f"(in use: pid {os.getpid()})" in line and "float16" in line
    report = cache_command(str(tmp_path / "c"), max_size="0")
    assert report["pruned"]["removed_entries"] == 0 and report["pruned"]["held_entries"] == len(items)
    json.dumps(report)  # plain data
