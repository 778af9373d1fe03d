"""MONAI Label 0.8.5 serves the exported fine-tuning bundles over HTTP, without anatomask_components.

The server runs in its own virtual environment, built once by ``.ci/monailabel_env.sh`` (cached under
``~/.cache/anatomask``), which holds MONAI Label and its pins but not this package. The models are archives
made by ``anatomask export-bundle`` (the package's code travels in their ``scripts/``), unpacked into the
``monaibundle`` sample app's model folder, with tiny initialised weights. The studies folder holds the real
example CT (case A, 3 mm, 122 x 101 x 112) with its FLARE22 label as the final label, and A's CT plus a
synthetic PET in one 2-channel NIfTI for AutoPET. One server, one module: infer with FLARE22, AMOS22 and
AutoPET, then one epoch of FLARE22 training through MONAI Label's bundle train task.

See docs/monailabel.md for the same steps by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from monailabel_common import (
    adapt_for_cpu,
    export_archive,
    http,
    log_tail,
    running_server,
    unpack,
    wait_for_task,
)

pytestmark = [pytest.mark.slow, pytest.mark.network]

FLARE22 = "anatomask_finetune_flare22"
AMOS22 = "anatomask_finetune_amos22"
AUTOPET = "anatomask_finetune_autopet"
SERVED = (FLARE22, AMOS22, AUTOPET)
INFER_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 600
# for the test's time only, a coarser grid than the scan's 3 mm and less window overlap (on top of the
# bundles' small-model override): the sliding window over A at the bundles' 1.5 mm takes about 450 s per
# request on one shared core, about 10 s at 4 mm.
FAST = {"spacing": [4.0, 4.0, 4.0], "sw_overlap": 0.25}


def _stored_lps(source: Path, out: Path) -> Path:
    """The same scan stored in LPS voxel order (A is stored RAS): reorientation must be undone on output."""
    image = nib.load(source)
    to_lps = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt("LPS")
    )
    nib.save(image.as_reoriented(to_lps), out)
    return out


def _pet_ct(ct_path: Path, out: Path) -> Path:
    """A CT with a synthetic SUV channel (a hot sphere) in one 2-channel NIfTI: (x, y, z, 2)."""
    ct = nib.load(ct_path)
    hu = np.asanyarray(ct.dataobj).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in hu.shape], indexing="ij"), axis=-1)
    centre = np.array(hu.shape) / 2
    suv = (0.5 + 9.5 * (np.linalg.norm(grid - centre, axis=-1) < 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([hu, suv], axis=-1), ct.affine), out)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, monailabel_python: Path, ct: dict[str, Path]) -> dict[str, Any]:
    """The monaibundle app with the exported bundles, and a studies folder."""
    root = tmp_path_factory.mktemp("monailabel")
    apps = root / "apps"
    done = subprocess.run(
        [str(monailabel_python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle"]
        + ["--output", str(apps)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        check=False,
    )
    app = apps / "monaibundle"
    assert done.returncode == 0 and (app / "main.py").is_file(), done.stdout + done.stderr
    archives = root / "archives"
    archives.mkdir()
    bundles = {}
    for bundle in SERVED:
        bundles[bundle] = unpack(export_archive(bundle, archives), app / "model", bundle)
        adapt_for_cpu(bundles[bundle], FAST)

    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    # two labelled copies of A: MONAI Label's train task splits the datastore into training and validation
    _stored_lps(ct["image"], studies / "A_ct.nii.gz")
    _stored_lps(ct["label"], studies / "labels" / "final" / "A_ct.nii.gz")
    shutil.copy(ct["image"], studies / "A_ct_copy.nii.gz")
    shutil.copy(ct["label"], studies / "labels" / "final" / "A_ct_copy.nii.gz")
    _pet_ct(studies / "A_ct.nii.gz", studies / "A_petct.nii.gz")
    return {"root": root, "app": app, "studies": studies, "bundles": bundles, "python": monailabel_python}


@pytest.fixture(scope="module")
def server(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``monailabel start_server`` on 127.0.0.1 (a free port); always stopped, with its children."""
    conf = {"models": ",".join(SERVED), "zoo_source": "local", "preload": "false", "sam2": "false"}
    with running_server(served["python"], served["app"], served["studies"], served["root"], conf) as running:
        yield {**served, **running}


def _channel_def(bundle_dir: Path) -> dict[str, str]:
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    return metadata["network_data_format"]["outputs"]["pred"]["channel_def"]


def _infer(server: dict[str, Any], bundle: str, image_id: str, tmp_path: Path) -> nib.Nifti1Image:
    url = f"{server['url']}/infer/{bundle}?image={image_id}&output=image"
    status, content = http("POST", url, timeout=INFER_TIMEOUT_S)
    assert status == 200, f"{url}: {status} {content[:2000]!r}\n{log_tail(server['log'])}"
    out = tmp_path / f"{bundle}_{image_id}.nii.gz"
    out.write_bytes(content)
    return nib.load(out)


def test_environment_has_no_anatomask_components(monailabel_python: Path, tmp_path):
    code = "import importlib.util, monailabel; print(importlib.util.find_spec('anatomask_components'))"
    done = subprocess.run(
        [str(monailabel_python), "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None"


def test_info_lists_the_bundles_with_their_labels(server):
    models = server["info"]["models"]
    for bundle in SERVED:
        expected = {v.lower(): int(k) for k, v in _channel_def(server["bundles"][bundle]).items()}
        expected.pop("background")
        assert models[bundle]["labels"] == expected, bundle
        assert models[bundle]["type"] == "segmentation"
    assert FLARE22 in server["info"]["trainers"]


@pytest.mark.parametrize("bundle", [FLARE22, AMOS22])
def test_infer_ct_in_the_input_geometry(server, bundle, tmp_path):
    source = nib.load(server["studies"] / "A_ct.nii.gz")
    assert nib.aff2axcodes(source.affine) == ("L", "P", "S")
    label = _infer(server, bundle, "A_ct", tmp_path)
    assert label.shape == source.shape
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    ids = set(np.unique(np.asanyarray(label.dataobj)).astype(int).tolist())
    assert ids <= {int(k) for k in _channel_def(server["bundles"][bundle])}, ids


def test_infer_autopet_from_one_two_channel_file(server, tmp_path):
    source = nib.load(server["studies"] / "A_petct.nii.gz")
    label = _infer(server, AUTOPET, "A_petct", tmp_path)
    assert label.shape == source.shape[:3]
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    ids = set(np.unique(np.asanyarray(label.dataobj)).astype(int).tolist())
    assert ids <= {0, 1}, ids


def test_train_one_epoch_through_the_bundle_train_task(server):
    bundle_dir = server["bundles"][FLARE22]
    model = bundle_dir / "models" / "model.pt"
    weights_before = model.read_bytes()
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "pretrained": True}
    status, content = http("POST", f"{server['url']}/train/{FLARE22}", body=params)
    assert status == 200, f"{status} {content[:2000]!r}"
    task = wait_for_task(server["url"], "train", TRAIN_TIMEOUT_S, server["log"])
    details = "\n".join(task.get("details", []))
    assert task.get("status") == "DONE", f"{task.get('status')}\n{details}\n{log_tail(server['log'])}"
    # the bundle's progress log and its best-model saver (validation on the second copy of A) ran
    progress = bundle_dir / "runs" / "training_log.jsonl"
    assert progress.is_file() and progress.read_text().strip(), details
    assert model.read_bytes() != weights_before, "the best model was not saved after validation"
