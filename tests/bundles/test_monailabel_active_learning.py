"""Active learning on reconstruction difficulty through a real MONAI Label 0.8.5 server.

``anatomask export-monailabel-app`` writes an app holding the exported pretraining bundle (tiny initialised
weights) and the exported FLARE22 bundle. The server runs it in the cached MONAI Label environment of
test_monailabel_server.py, without anatomask_components: the scoring method imports the scorer from the
pretraining bundle's ``scripts/``. The studies are the real example CT A, a copy with noise, a cropped copy
and a labelled copy. The server test scores them (``POST /scoring/anatomask_difficulty``), checks each stored
score against the scorer run here on the same file, asks ``anatomask_hardest`` for the hardest image, saves a
label for it, gets the next one, scores again (nothing rescored) and still gets an image from ``random``.

The first tests check the exporter alone and need no server.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
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
    tiny_weights,
    upload,
    wait_for_task,
)

from anatomask_components.bundle_builder import finetune_bundles
from anatomask_components.export import export_bundle
from anatomask_components.monailabel_app import APP_FILES, PRETRAIN, export_monailabel_app

FLARE22 = "anatomask_finetune_flare22"
DIFFICULTY = "anatomask_difficulty"
HARDEST = "anatomask_hardest"
SCORING_TIMEOUT_S = 300
# Scoring tiles the whole scan with the bundle's windows: at 4 mm instead of 1.5 mm the tiny network scores
# example case A in seconds instead of minutes on one shared core.
FAST = {"spacing": [4.0, 4.0, 4.0], "sw_overlap": 0.25}
# the scorer's options the app is started with, and the same ones for the reference run in this process
SCORER = {"weights": "teacher", "num_masks": 2, "batch_size": 2, "device": "cpu"}
UNLABELLED = ("A_ct", "A_noisy", "A_crop")
LABELLED = "A_labelled"


def server_test(test):
    """Marks a test that needs the MONAI Label environment and the example CT (skipped as in
    test_monailabel_server.py when neither is cached and the package index is unreachable)."""
    return pytest.mark.network(pytest.mark.slow(test))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anatomask_components.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


@pytest.fixture(scope="module")
def pretrain_weights(tmp_path_factory) -> Path:
    return tiny_weights(PRETRAIN, tmp_path_factory.mktemp("weights") / "pretrain.pt")


def test_app_holds_the_pretraining_bundle_and_code_without_the_package(pretrain_weights, tmp_path):
    app = export_monailabel_app(tmp_path / "app", pretrain_weights)
    code = [p.relative_to(app) for p in app.rglob("*.py")]
    assert sorted(p.as_posix() for p in code if p.parts[0] != "model") == sorted(APP_FILES)
    bundle = app / "model" / PRETRAIN
    assert (bundle / "models" / "model.pt").read_bytes() == pretrain_weights.read_bytes()
    assert (bundle / "scripts" / "anatomask_components" / "difficulty.py").is_file()
    assert json.loads((bundle / "models" / "fingerprint.json").read_text())
    for name in APP_FILES:
        assert "anatomask_components" not in _imported_modules(app / name), name
    assert "lib" in _imported_modules(app / "main.py")
    # built beside its place and renamed: nothing else is left in the parent folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]


@pytest.mark.slow
def test_errors_name_the_file_and_leave_nothing_behind(pretrain_weights, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    done = _run_cli("export-monailabel-app", str(tmp_path / "taken"), "--pretrained", str(pretrain_weights))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"anatomask export-monailabel-app: error: {tmp_path / 'taken'}: exists and is not an empty folder; "
        "choose a new app folder"
    )

    archive = str(export_bundle(PRETRAIN, tmp_path / "pretrain.zip", pretrain_weights))
    done = _run_cli(
        "export-monailabel-app", str(tmp_path / "app"), "--pretrained", archive, "--finetuned", archive
    )
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        f"error: {archive}: expected one folder named {' or '.join(finetune_bundles())}, found {PRETRAIN}"
    ), done.stderr
    assert not (tmp_path / "app").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain.zip", "taken"]


# ----------------------------------------------------------------------------------------- the real server


def _studies(ct: dict[str, Path], studies: Path) -> None:
    """A as it is, with noise (sigma 150 HU, seeded), cropped to its upper half, and a labelled copy."""
    image = nib.load(ct["image"])
    hu = np.asanyarray(image.dataobj).astype(np.float32)
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(ct["image"], studies / "A_ct.nii.gz")
    noisy = hu + np.random.default_rng(0).normal(0.0, 150.0, hu.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, image.affine), studies / "A_noisy.nii.gz")
    nib.save(image.slicer[:, :, hu.shape[2] // 2 :], studies / "A_crop.nii.gz")
    shutil.copy(ct["image"], studies / f"{LABELLED}.nii.gz")
    shutil.copy(ct["label"], studies / "labels" / "final" / f"{LABELLED}.nii.gz")


@pytest.fixture(scope="module")
def served(tmp_path_factory, monailabel_python: Path, ct: dict[str, Path], pretrain_weights: Path) -> dict:
    """The app written by the command line, with the CPU settings merged into its bundles, and the studies."""
    root = tmp_path_factory.mktemp("monailabel_al")
    flare22 = export_archive(FLARE22, root)
    app = root / "app"
    done = _run_cli(
        "export-monailabel-app", str(app), "--pretrained", str(pretrain_weights), "--finetuned", str(flare22)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"[export-monailabel-app] {app}: bundles {FLARE22}, {PRETRAIN}"
    pretrain = app / "model" / PRETRAIN
    adapt_for_cpu(pretrain, FAST, names=("inference.json",))
    adapt_for_cpu(app / "model" / FLARE22, FAST)
    studies = root / "studies"
    _studies(ct, studies)
    return {"root": root, "app": app, "pretrain": pretrain, "studies": studies, "python": monailabel_python}


@pytest.fixture(scope="module")
def server(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conf = {f"difficulty_{k}": str(v) for k, v in SCORER.items()}
    conf.update({"models": FLARE22, "skip_trainers": "true"})
    # scoring is started by the test, not by MONAI Label at start-up and after every request
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    with running_server(
        served["python"], served["app"], served["studies"], served["root"], conf, env
    ) as running:
        yield {**served, **running}


def _stored(server: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Image id -> image info, as the datastore file holds it."""
    objects = json.loads((server["studies"] / "datastore_v2.json").read_text())["objects"]
    return {image_id: obj["image"]["info"] for image_id, obj in objects.items()}


def _score(server: dict[str, Any]) -> dict[str, Any]:
    """``POST /scoring/anatomask_difficulty``, waited for; returns the summary the scoring process logged."""
    status, content = http("POST", f"{server['url']}/scoring/{DIFFICULTY}")
    assert status == 200, f"{status} {content[:2000]!r}"
    task = wait_for_task(server["url"], "scoring", SCORING_TIMEOUT_S, server["log"])
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", f"{details}\n{log_tail(server['log'])}"
    summaries = re.findall(r"Result: (\{.*\})", details)
    assert summaries, details
    return json.loads(summaries[-1])


def _next(server: dict[str, Any], strategy: str) -> dict[str, Any]:
    status, content = http("POST", f"{server['url']}/activelearning/{strategy}", body={})
    assert status == 200, f"{status} {content[:2000]!r}\n{log_tail(server['log'])}"
    return json.loads(content)


@server_test
def test_app_registers_the_strategies_the_scoring_method_and_the_model(server):
    info = server["info"]
    assert set(info["strategies"]) == {HARDEST, "random", "first"}
    assert set(info["scoring"]) == {DIFFICULTY}
    assert set(info["models"]) == {FLARE22}


@server_test
def test_scoring_stores_the_scorers_result_for_every_unlabelled_image(server, tmp_path):
    summary = _score(server)
    digest = hashlib.sha256((server["pretrain"] / "models" / "model.pt").read_bytes()).hexdigest()
    assert summary == {
        **summary,
        "total": 3,
        "skipped": 0,
        "executed": 3,
        "failed": 0,
        "model_digest": digest,
    }
    stored = _stored(server)
    assert DIFFICULTY not in stored[LABELLED]
    # the same scorer in this process, on the repository's bundle with the same settings and weights
    reference = tmp_path / PRETRAIN
    shutil.copytree(
        Path(__file__).resolve().parents[2] / "bundles" / PRETRAIN / "configs", reference / "configs"
    )
    shutil.copytree(server["pretrain"] / "models", reference / "models")
    adapt_for_cpu(reference, FAST, names=("inference.json",))
    from anatomask_components.difficulty import DifficultyScorer

    with pytest.warns(UserWarning, match="no training checkpoint with a teacher"):
        scorer = DifficultyScorer(reference, **SCORER)
    assert scorer.model_digest == digest
    for image_id in UNLABELLED:
        entry = stored[image_id][DIFFICULTY]
        expected = scorer.score_file(server["studies"] / f"{image_id}.nii.gz")
        assert entry["model_digest"] == digest
        assert entry["weights"] == "student models/model.pt (no teacher checkpoint in the bundle)"
        np.testing.assert_allclose(entry["score"], expected.score, rtol=1e-4, err_msg=image_id)
        np.testing.assert_allclose(entry["quantile"], expected.quantile, rtol=1e-4, err_msg=image_id)
        assert entry["flags"] == expected.flags
    scores = [stored[i][DIFFICULTY]["score"] for i in UNLABELLED]
    assert len(set(scores)) == len(scores), scores


@server_test
def test_hardest_first_then_the_next_after_a_label_is_saved(server, tmp_path):
    stored = _stored(server)
    order = sorted(UNLABELLED, key=lambda i: -stored[i][DIFFICULTY]["score"])
    first = _next(server, HARDEST)
    assert first["id"] == order[0], (order, first)
    assert first["score"] == stored[order[0]][DIFFICULTY]["score"]
    # served again until a label is saved
    assert _next(server, HARDEST)["id"] == order[0]

    image = nib.load(server["studies"] / f"{order[0]}.nii.gz")
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), label)
    url = f"{server['url']}/datastore/label?image={order[0]}&tag=final"
    status, content = upload(url, {"params": "{}"}, "label", label)
    assert status == 200, f"{status} {content[:2000]!r}"
    assert (server["studies"] / "labels" / "final" / f"{order[0]}.nii.gz").is_file()

    second = _next(server, HARDEST)
    assert second["id"] == order[1], (order, second)
    stored = _stored(server)
    assert stored[order[1]]["strategy"][HARDEST]["ts"] >= stored[order[0]]["strategy"][HARDEST]["ts"]


@server_test
def test_scoring_again_skips_the_scored_images(server):
    before = _stored(server)
    summary = _score(server)
    assert (summary["total"], summary["skipped"], summary["executed"]) == (2, 2, 0)
    after = _stored(server)
    for image_id in UNLABELLED:
        assert after[image_id][DIFFICULTY] == before[image_id][DIFFICULTY], image_id


@server_test
def test_random_still_serves_an_unlabelled_image(server):
    labelled = {p.name.removesuffix(".nii.gz") for p in (server["studies"] / "labels" / "final").iterdir()}
    assert len(labelled) == 2
    assert _next(server, "random")["id"] in set(UNLABELLED) - labelled
