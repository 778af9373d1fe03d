"""Fine-tuning bundles built from one template and a dataset folder; bundles discovered from their folder.

- Every committed fine-tuning bundle is exactly what ``anatomask build-bundle`` writes from its ``dataset/``
  folder (labels written once, in spec.json).
- A fourth dataset is four files and one command, no code change: it trains and segments phantoms under
  ``python -m monai.bundle run`` and exports as an archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from finetune_common import check_same_geometry

from anatomask_components import cli
from anatomask_components.bundle_builder import (
    DATASET_FILES,
    DATASET_FOLDER,
    REPOSITORY_BUNDLES,
    TEMPLATE_DIR,
    DatasetSpec,
    build_bundle,
    build_repository_bundles,
    bundle_differences,
    bundle_folder,
    discover_bundles,
    finetune_bundles,
    render_bundle,
)
from anatomask_components.data.phantoms import make_affine, make_phantom, write_phantom_dataset
from anatomask_components.data.writers import write_volume

FINETUNE = list(finetune_bundles())
ANATOMASK = Path(sys.executable).parent / "anatomask"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the fourth dataset: two organs in CT
TOY_SPEC = {
    "labels": {"0": "background", "1": "kidney", "2": "spleen"},
    "dataset_dir": "/workspace/data/toy",
    "accepted_modalities": ["CT"],
    "normalization": "ct",
}
TOY_METADATA = {
    "version": "0.1.0",
    "changelog": {"0.1.0": "first release"},
    "name": "AnatoMask toy organ segmentation",
    "task": "Segmentation of 2 organs in CT",
    "description": "A STU-Net fine-tuned on two organs.",
    "data_source": "phantoms",
    "references": ["Toy et al., A toy dataset, 2026"],
    "network_data_format": {"inputs": {"image": {"format": "hounsfield", "channel_def": {"0": "image"}}}},
}
TOY_README = """# AnatoMask fine-tuning: toy organs (CT)

Fine-tunes a STU-Net on two organs.

## Data

Phantoms.

## Paper figures (not measured by this bundle)

None: the paper has no toy experiment.
"""


def write_dataset(folder: Path, spec=TOY_SPEC, metadata=TOY_METADATA, readme=TOY_README) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec, indent=4))
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=4))
    (folder / "README_data.md").write_text(readme, encoding="utf-8")
    (folder / "data_license.txt").write_text("Synthetic phantoms, no terms.\n")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != DATASET_FOLDER
    }


# ------------------------------------------------------------------------------- the committed bundles


@pytest.mark.parametrize("bundle", FINETUNE)
def test_committed_bundle_is_what_the_builder_writes(bundle, tmp_path):
    """Rebuilt from its dataset folder into an empty folder, the bundle has the committed files, byte for
    byte (models/, runs/ and other outputs of runs are ignored by git and not compared)."""
    committed = REPOSITORY_BUNDLES / bundle
    built = build_bundle(committed / DATASET_FOLDER, tmp_path / bundle)
    expected = _files(built)
    found = {
        path: content
        for path, content in _files(committed).items()
        if path.split("/")[0] in ("configs", "docs") or path in expected
    }
    fix = f"rebuild it with `anatomask build-bundles` (or edit {committed / DATASET_FOLDER}, not the output)"
    assert sorted(found) == sorted(expected), f"{bundle}: files differ from the builder's; {fix}"
    for path, content in expected.items():
        assert found[path] == content, f"{bundle}/{path} is not what the builder writes; {fix}"
    assert bundle_differences(committed) == []
    assert sorted(p.name for p in (committed / DATASET_FOLDER).iterdir()) == sorted(DATASET_FILES)


@pytest.mark.parametrize("bundle", FINETUNE)
def test_labels_are_written_once(bundle):
    """spec.json holds the labels; the configs, the metadata's channel_def and prose and the README's table
    are written from it."""
    folder = REPOSITORY_BUNDLES / bundle
    labels = json.loads((folder / DATASET_FOLDER / "spec.json").read_text())["labels"]
    configs = folder / "configs"
    metadata = json.loads((configs / "metadata.json").read_text())
    assert json.loads((configs / "train.json").read_text())["labels"] == labels
    assert json.loads((configs / "inference.json").read_text())["labels"] == labels
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == labels
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == len(labels)
    assert metadata["label_classes"] == ", ".join(f"{k} {v}" for k, v in labels.items())
    assert metadata["pred_classes"].startswith(f"{len(labels)} channels")
    readme = (folder / "docs" / "README.md").read_text(encoding="utf-8")
    assert "| id | class |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in labels.items()) in readme
    assert f"--num_classes {len(labels)}" in readme
    for name in DATASET_FILES[1:]:
        text = (folder / DATASET_FOLDER / name).read_text(encoding="utf-8")
        assert "label_classes" not in text and "pred_classes" not in text, name


def test_the_metadata_describes_each_bundles_normalisation():
    """image_classes is written from the spec's normalisation: CT by nnU-Net's scheme with the dataset
    fingerprint (no longer "z-scored per image"), MR z-scored, PET in SUV."""

    def image_classes(bundle: str) -> str:
        return json.loads((REPOSITORY_BUNDLES / bundle / "configs" / "metadata.json").read_text())[
            "image_classes"
        ]

    ct = "CT with nnU-Net's CT scheme (clipped to the dataset fingerprint's foreground percentiles"
    assert image_classes("anatomask_finetune_flare22") == (
        "single channel CT, reoriented to RAS and resampled to 1.5 mm; intensities: " + ct + " 0.5 and 99.5, "
        "then z-scored with its foreground mean and std)"
    )
    amos = image_classes("anatomask_finetune_amos22")
    assert amos.startswith("single channel CT or MR (the modality of each case from the datalist)")
    assert ct in amos and amos.endswith("MR z-scored per image")
    autopet = image_classes("anatomask_finetune_autopet")
    assert autopet.startswith("2 channels (CT, PET)") and ct in autopet
    assert autopet.endswith("PET clipped to SUV 0-20 and divided by 20")


def test_discovery():
    """The bundles are the folders of bundles/ with configs/metadata.json; fine-tuning ones have a spec."""
    expected = sorted(p.parent.parent.name for p in REPOSITORY_BUNDLES.glob("*/configs/metadata.json"))
    assert list(discover_bundles()) == expected and "anatomask_pretrain" in expected
    assert FINETUNE == [n for n in expected if (REPOSITORY_BUNDLES / n / "dataset" / "spec.json").is_file()]
    assert "anatomask_pretrain" not in FINETUNE and len(FINETUNE) >= 3
    assert bundle_folder("anatomask_pretrain") == REPOSITORY_BUNDLES / "anatomask_pretrain"
    assert bundle_folder(REPOSITORY_BUNDLES / FINETUNE[0]) == REPOSITORY_BUNDLES / FINETUNE[0]
    with pytest.raises(ValueError, match="unknown bundle 'nope'; give a bundle folder"):
        bundle_folder("nope")
    assert discover_bundles(REPOSITORY_BUNDLES / "missing") == {}


def test_build_bundles_check_and_rebuild(tmp_path, monkeypatch, capsys):
    """``anatomask build-bundles --check`` passes on the repository; a copy with a hand-edited config is
    named, and rebuilding restores it."""
    monkeypatch.setattr(sys, "argv", ["anatomask", "build-bundles", "--check"])
    cli.main()
    out = capsys.readouterr().out
    assert all(f"[build-bundles] {name}: up to date" in out for name in FINETUNE)

    copy = tmp_path / "bundles"
    shutil.copytree(
        REPOSITORY_BUNDLES / FINETUNE[0], copy / FINETUNE[0], ignore=shutil.ignore_patterns("models", "runs")
    )
    train = copy / FINETUNE[0] / "configs" / "train.json"
    original = train.read_bytes()
    train.write_text(train.read_text().replace('"max_epochs": 1000', '"max_epochs": 5'))
    (copy / FINETUNE[0] / "docs" / "notes.md").write_text("stale")
    assert build_repository_bundles(check=True, root=copy) == {
        FINETUNE[0]: [
            "configs/train.json: differs from what the builder writes",
            "docs/notes.md: not written by the builder (stale)",
        ]
    }
    build_repository_bundles(root=copy)
    assert train.read_bytes() == original
    assert bundle_differences(copy / FINETUNE[0]) == ["docs/notes.md: not written by the builder (stale)"]


# ------------------------------------------------------------------------------- what the builder refuses


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key\\(s\\) colour"),
        ({"labels": {"0": "background", "2": "spleen"}}, 'labels must map the ids "0", "1", ... in order'),
        ({"labels": {"0": "background", "1": "organ", "2": "organ"}}, "label names must be distinct"),
        ({"accepted_modalities": ["ct"]}, "write the modality 'ct' as 'CT'"),
        ({"normalization": {"CT": "minmax"}}, "normalisation for CT must be one of"),
        (
            {"in_channels": 2, "channel_modalities": ["CT"]},
            "channel_modalities must be null or a list of in_channels",
        ),
        ({"inference_modality": "MR"}, "must be among accepted_modalities"),
        ({"lesion_volumes": "yes"}, "lesion_volumes must be true or false"),
    ],
)
def test_bad_specs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        DatasetSpec.from_dict({**TOY_SPEC, **change})


def test_metadata_and_readme_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="label_classes is written from spec.json"):
        render_bundle(write_dataset(tmp_path / "a", metadata={**TOY_METADATA, "label_classes": "x"}), "a")
    missing_name = {k: v for k, v in TOY_METADATA.items() if k != "name"}
    with pytest.raises(ValueError, match="name comes from the dataset's metadata.json"):
        render_bundle(write_dataset(tmp_path / "b", metadata=missing_name), "b")
    with pytest.raises(ValueError, match="no place in the template for ## Results"):
        render_bundle(write_dataset(tmp_path / "c", readme=TOY_README + "\n## Results\n\nnone\n"), "c")
    with pytest.raises(ValueError, match="unknown placeholder \\{\\{colour\\}\\}"):
        render_bundle(write_dataset(tmp_path / "d", readme=TOY_README + "\n{{colour}}\n"), "d")
    (write_dataset(tmp_path / "e") / "data_license.txt").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_license.txt"):
        render_bundle(tmp_path / "e", "e")


def test_the_template_has_one_source_of_every_shared_file():
    """The shared configs, logging.conf, LICENSE and README live once, in the package."""
    shared = {
        "LICENSE",
        "configs/logging.conf",
        "configs/multi_gpu_train.json",
        "configs/small_override.json",
    }
    for path in shared | {"configs/unetr_override.json", "configs/evaluate.json"}:
        assert (TEMPLATE_DIR / path).is_file(), path
    for bundle in FINETUNE:
        for path in shared:
            assert (REPOSITORY_BUNDLES / bundle / path).read_bytes() == (TEMPLATE_DIR / path).read_bytes()


# ------------------------------------------------------------------------------- a fourth dataset


@pytest.mark.slow
def test_a_fourth_dataset_is_four_files_and_one_command(tmp_path):
    """A 2-organ CT dataset written as its four files builds into a bundle that trains on phantoms under
    ``python -m monai.bundle run``, segments a scan in its geometry with its label ids, is discovered in its
    bundles folder, and exports as an archive: no code changes."""
    bundles = tmp_path / "bundles"
    dataset = write_dataset(bundles / "anatomask_finetune_toy" / DATASET_FOLDER)
    assert sorted(p.name for p in dataset.iterdir()) == sorted(DATASET_FILES)
    done = subprocess.run(
        [str(ANATOMASK), "build-bundle", str(dataset)], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0, done.stderr
    bundle = bundles / "anatomask_finetune_toy"
    assert list(finetune_bundles(bundles)) == ["anatomask_finetune_toy"]
    assert bundle_differences(bundle) == []
    configs = bundle / "configs"
    assert json.loads((configs / "train.json").read_text())["labels"] == TOY_SPEC["labels"]
    readme = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert (
        readme.startswith("# AnatoMask fine-tuning: toy organs (CT)\n")
        and "cd bundles/anatomask_finetune_toy" in readme
    )

    write_phantom_dataset(
        tmp_path / "data", n_cases=3, shape=(40, 40, 40), num_classes=3, fractions=(0.34, 0.33, 0.33)
    )
    run = tmp_path / "run"
    common = ["--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf")]
    train = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", f"['{configs}/train.json','{configs}/small_override.json']", *common,
        "--bundle_root", str(run), "--dataset_dir", str(tmp_path / "data" / "datalist.json"),
    ]  # fmt: skip
    done = subprocess.run(train, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run / "models" / "model.pt").is_file() and (run / "models" / "fingerprint.json").is_file()

    affine = make_affine((1.2, 0.9, 2.0), flip=(True, False, False), rotation_deg=(0, 5, 10))
    image, _, _ = make_phantom((36, 40, 22), num_classes=3, seed=5, affine=affine)
    write_volume(tmp_path / "scans" / "case.nii.gz", image, affine)
    infer = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", f"['{configs}/inference.json','{configs}/small_override.json']", *common,
        "--bundle_root", str(run), "--dataset_dir", str(tmp_path / "scans"),
        "--output_dir", str(tmp_path / "predictions"),
    ]  # fmt: skip
    done = subprocess.run(infer, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    labels = check_same_geometry(
        tmp_path / "scans" / "case.nii.gz", tmp_path / "predictions" / "case_seg.nii.gz", 3
    )
    assert set(labels.flat) <= {0, 1, 2}

    archive = tmp_path / "toy.zip"
    done = subprocess.run(
        [str(ANATOMASK), "export-bundle", str(bundle), "--out", str(archive)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        exported = json.loads(zf.read("anatomask_finetune_toy/configs/inference.json"))
    assert {n.split("/")[0] for n in names} == {"anatomask_finetune_toy"}
    assert (
        "anatomask_finetune_toy/docs/README.md" in names
        and "anatomask_finetune_toy/scripts/__init__.py" in names
    )
    assert not [n for n in names if f"/{DATASET_FOLDER}/" in n]  # the sources stay behind
    assert exported["labels"] == TOY_SPEC["labels"]
