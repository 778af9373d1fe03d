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
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from anatomask_components.data import examples
from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.phantoms import phantom_fingerprint

pytestmark = [pytest.mark.slow, pytest.mark.network]

REPO = Path(__file__).resolve().parents[2]
ENV_SCRIPT = REPO / ".ci" / "monailabel_env.sh"
FLARE22 = "anatomask_finetune_flare22"
AMOS22 = "anatomask_finetune_amos22"
AUTOPET = "anatomask_finetune_autopet"
SERVED = (FLARE22, AMOS22, AUTOPET)
ENV_BUILD_TIMEOUT_S = 3600
SERVER_START_TIMEOUT_S = 300
INFER_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 600
# What an operator changes in a served bundle for a CPU machine: the bundles' own small-model override
# (tiny STU-Net, 32^3 patches, 2 iterations per epoch, no loader workers) merged into the configs MONAI
# Label reads (it reads inference.json and train.json only and cannot merge an override itself).
OVERRIDE = "small_override.json"
# and, for the test's time only, a coarser grid than the scan's 3 mm and less window overlap: the sliding
# window over A at the bundles' 1.5 mm takes about 450 s per request on one shared core, about 10 s at 4 mm.
FAST = {"spacing": [4.0, 4.0, 4.0], "sw_overlap": 0.25}


def _env_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ENV_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=ENV_BUILD_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    """The MONAI Label environment's interpreter (built on first use, then cached)."""
    cached = _env_script("--check")
    if cached.returncode != 0:
        if not examples.index_reachable():
            pytest.skip(
                f"pip cannot reach the package index ({examples.index_url()}) and no MONAI Label "
                f"environment is cached ({cached.stderr.strip()}); build it with {ENV_SCRIPT}"
            )
        built = _env_script()
        assert built.returncode == 0, f"{ENV_SCRIPT} failed:\n{built.stderr[-6000:]}"
        cached = built
    python = Path(cached.stdout.strip().splitlines()[-1]) / "bin" / "python"
    assert python.exists(), cached.stdout
    return python


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict[str, Path]:
    """Example case A: CT and its FLARE22 label."""
    if not (examples.default_cache_dir() / examples.ARCHIVE_NAME).exists() and not examples.index_reachable():
        pytest.skip("package index unreachable and no cached TotalSegmentator archive")
    dest = tmp_path_factory.mktemp("examples")
    examples.fetch_examples(str(dest))
    return {"image": dest / "images" / "A_ct.nii.gz", "label": dest / "labels" / "A_flare22.nii.gz"}


def _tiny_weights(bundle: str, path: Path) -> Path:
    """A flat state dict of the bundle's network_def under its small-model override (initialised, seed 0)."""
    parser = ConfigParser()
    configs = REPO / "bundles" / bundle / "configs"
    parser.read_config([str(configs / "inference.json"), str(configs / OVERRIDE)])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    write_fingerprint(path, phantom_fingerprint())
    return path


def _export(bundle: str, folder: Path) -> Path:
    """``anatomask export-bundle`` with tiny weights; returns the archive."""
    archive = folder / f"{bundle}.zip"
    weights = _tiny_weights(bundle, folder / f"{bundle}_weights.pt")
    command = [sys.executable, "-m", "anatomask_components.cli", "export-bundle", bundle]
    command += ["--out", str(archive), "--weights", str(weights)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and archive.is_file(), f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return archive


def _unpack(archive: Path, model_dir: Path, bundle: str) -> Path:
    """Unpack an archive into the app's model folder as ``model/<bundle>`` (the Zoo's layout: one folder)."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert all(n.startswith(f"{bundle}/") for n in names), f"{archive}: expected one folder {bundle}/"
        zf.extractall(model_dir)
    bundle_dir = model_dir / bundle
    assert (bundle_dir / "configs" / "metadata.json").is_file()
    assert (bundle_dir / "models" / "model.pt").is_file()
    return bundle_dir


def _adapt_for_cpu(bundle_dir: Path) -> None:
    """Merge the bundle's small-model override into the configs MONAI Label reads."""
    configs = bundle_dir / "configs"
    override = json.loads((configs / OVERRIDE).read_text())
    for name in ("inference.json", "train.json"):
        path = configs / name
        config = json.loads(path.read_text())
        config.update({k: v for k, v in {**override, **FAST}.items() if k in config})
        path.write_text(json.dumps(config, indent=4) + "\n")


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
        bundles[bundle] = _unpack(_export(bundle, archives), app / "model", bundle)
        _adapt_for_cpu(bundles[bundle])

    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    # two labelled copies of A: MONAI Label's train task splits the datastore into training and validation
    _stored_lps(ct["image"], studies / "A_ct.nii.gz")
    _stored_lps(ct["label"], studies / "labels" / "final" / "A_ct.nii.gz")
    shutil.copy(ct["image"], studies / "A_ct_copy.nii.gz")
    shutil.copy(ct["label"], studies / "labels" / "final" / "A_ct_copy.nii.gz")
    _pet_ct(studies / "A_ct.nii.gz", studies / "A_petct.nii.gz")
    return {"root": root, "app": app, "studies": studies, "bundles": bundles, "python": monailabel_python}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _log_tail(path: Path, chars: int = 8000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no server log)"


@pytest.fixture(scope="module")
def server(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``monailabel start_server`` on 127.0.0.1 (a free port); always stopped, with its children."""
    port = _free_port()
    log_path = served["root"] / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("OMP_NUM_THREADS", "1")  # see tests/conftest.py: shared cores
    env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
    command = [str(served["python"]), "-m", "monailabel.main", "start_server"]
    command += ["--app", str(served["app"]), "--studies", str(served["studies"])]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    conf = {"models": ",".join(SERVED), "zoo_source": "local", "preload": "false", "sam2": "false"}
    for key, value in conf.items():
        command += ["--conf", key, value]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        # its own session: teardown stops the server and the training processes it starts
        process = subprocess.Popen(
            command,
            cwd=served["root"],  # start_server writes .env in its working folder
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        info = None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited ({process.returncode}):\n{_log_tail(log_path)}"
            try:
                status, content = _http("GET", f"{url}/info/", timeout=10)
                if status == 200:
                    info = json.loads(content)
                    break
            except OSError:
                pass
            time.sleep(2)
        assert info is not None, f"server not up in {SERVER_START_TIMEOUT_S} s:\n{_log_tail(log_path)}"
        yield {**served, "url": url, "info": info, "log": log_path}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        try:  # training subprocesses left in the session
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _channel_def(bundle_dir: Path) -> dict[str, str]:
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    return metadata["network_data_format"]["outputs"]["pred"]["channel_def"]


def _infer(server: dict[str, Any], bundle: str, image_id: str, tmp_path: Path) -> nib.Nifti1Image:
    url = f"{server['url']}/infer/{bundle}?image={image_id}&output=image"
    status, content = _http("POST", url, timeout=INFER_TIMEOUT_S)
    assert status == 200, f"{url}: {status} {content[:2000]!r}\n{_log_tail(server['log'])}"
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
    status, content = _http("POST", f"{server['url']}/train/{FLARE22}", body=params)
    assert status == 200, f"{status} {content[:2000]!r}"
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, content = _http("GET", f"{server['url']}/train/")
        task = json.loads(content) if status == 200 else {}
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(3)
    details = "\n".join(task.get("details", []))
    assert task.get("status") == "DONE", f"{task.get('status')}\n{details}\n{_log_tail(server['log'])}"
    # the bundle's progress log and its best-model saver (validation on the second copy of A) ran
    progress = bundle_dir / "runs" / "training_log.jsonl"
    assert progress.is_file() and progress.read_text().strip(), details
    assert model.read_bytes() != weights_before, "the best model was not saved after validation"
