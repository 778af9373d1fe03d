"""Shared pieces of the tests against a real MONAI Label 0.8.5 server.

The server runs in its own virtual environment, built once by ``.ci/monailabel_env.sh`` (cached under
``~/.cache/anatomask``), which holds MONAI Label and its pins but not this package. Bundles reach it as
archives made by ``anatomask export-bundle`` with tiny initialised weights. Each test module wraps these
functions in its own module-scoped fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser

from anatomask_components.data import examples
from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.phantoms import phantom_fingerprint

REPO = Path(__file__).resolve().parents[2]
ENV_SCRIPT = REPO / ".ci" / "monailabel_env.sh"
ENV_BUILD_TIMEOUT_S = 3600
SERVER_START_TIMEOUT_S = 300
# What an operator changes in a served bundle for a CPU machine: the bundles' own small-model override
# (tiny STU-Net, 32^3 patches, 2 iterations per epoch, no loader workers) merged into the configs MONAI
# Label reads (it reads inference.json and train.json only and cannot merge an override itself).
OVERRIDE = "small_override.json"


def _env_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ENV_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=ENV_BUILD_TIMEOUT_S,
        check=False,
    )


def monailabel_env_python() -> Path:
    """The MONAI Label environment's interpreter, built on first use and then cached; skips the calling test
    when it is not cached and the package index cannot be reached."""
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


def example_ct(dest: Path) -> dict[str, Path]:
    """Example case A (real CT, 3 mm, 122 x 101 x 112) and its FLARE22 label, written under ``dest``; skips
    the calling test when the example archive is neither cached nor downloadable."""
    if not (examples.default_cache_dir() / examples.ARCHIVE_NAME).exists() and not examples.index_reachable():
        pytest.skip("package index unreachable and no cached TotalSegmentator archive")
    examples.fetch_examples(str(dest))
    return {"image": dest / "images" / "A_ct.nii.gz", "label": dest / "labels" / "A_flare22.nii.gz"}


def tiny_weights(bundle: str, path: Path, seed: int = 0) -> Path:
    """A flat state dict of the bundle's ``network_def`` under its small-model override (initialised with
    ``seed``), with the phantom fingerprint beside it as training would write it."""
    parser = ConfigParser()
    configs = REPO / "bundles" / bundle / "configs"
    parser.read_config([str(configs / "inference.json"), str(configs / OVERRIDE)])
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    write_fingerprint(path, phantom_fingerprint())
    return path


def export_archive(bundle: str, folder: Path) -> Path:
    """``anatomask export-bundle`` with :func:`tiny_weights`; returns the archive ``folder/<bundle>.zip``."""
    archive = folder / f"{bundle}.zip"
    weights = tiny_weights(bundle, folder / f"{bundle}_weights.pt")
    command = [sys.executable, "-m", "anatomask_components.cli", "export-bundle", bundle]
    command += ["--out", str(archive), "--weights", str(weights)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and archive.is_file(), f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return archive


def unpack(archive: Path, model_dir: Path, bundle: str) -> Path:
    """Unpack an archive into an app's model folder as ``model/<bundle>`` (the Zoo's layout: one folder)."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert all(n.startswith(f"{bundle}/") for n in names), f"{archive}: expected one folder {bundle}/"
        zf.extractall(model_dir)
    bundle_dir = model_dir / bundle
    assert (bundle_dir / "configs" / "metadata.json").is_file()
    assert (bundle_dir / "models" / "model.pt").is_file()
    return bundle_dir


def adapt_for_cpu(
    bundle_dir: Path,
    extra: Mapping[str, Any] | None = None,
    names: tuple[str, ...] = ("inference.json", "train.json"),
) -> None:
    """Merge the bundle's small-model override (and ``extra``) into the configs MONAI Label reads; only keys
    that a config already has are changed."""
    configs = bundle_dir / "configs"
    override = {**json.loads((configs / OVERRIDE).read_text()), **(extra or {})}
    for name in names:
        path = configs / name
        config = json.loads(path.read_text())
        config.update({k: v for k, v in override.items() if k in config})
        path.write_text(json.dumps(config, indent=4) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """One JSON request; returns the status and the body (also for HTTP errors)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def upload(
    url: str, fields: Mapping[str, str], file_field: str, path: Path, timeout: float = 60
) -> tuple[int, bytes]:
    """A multipart/form-data PUT (MONAI Label's ``PUT /datastore/label``): ``fields`` plus one file."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + path.read_bytes()
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(url, data=b"".join(parts), method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def log_tail(path: Path, chars: int = 8000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no server log)"


def wait_for_task(url: str, task: str, timeout_s: float, log: Path) -> dict[str, Any]:
    """Poll ``GET /<task>/`` (train, scoring) until the latest task is DONE, ERROR or STOPPED; returns it."""
    deadline = time.monotonic() + timeout_s
    latest: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, content = http("GET", f"{url}/{task}/")
        latest = json.loads(content) if status == 200 else {}
        if latest.get("status") in ("DONE", "ERROR", "STOPPED"):
            return latest
        time.sleep(2)
    details = "\n".join(latest.get("details", []))
    raise AssertionError(
        f"{task} not finished in {timeout_s} s ({latest.get('status')}):\n{details}\n{log_tail(log)}"
    )


@contextmanager
def running_server(
    python: Path,
    app: Path,
    studies: Path,
    workdir: Path,
    conf: Mapping[str, str],
    env: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """``monailabel start_server`` on 127.0.0.1 (a free port), started from ``workdir`` (it writes ``.env``
    there) and stopped with every process it started.

    Args:
        python: the MONAI Label environment's interpreter.
        app: the app folder (``main.py``).
        studies: the datastore folder.
        workdir: working folder; the server's log goes to ``workdir/server.log``.
        conf: ``--conf`` key/value pairs.
        env: extra environment variables (MONAI Label settings such as ``MONAI_LABEL_AUTO_UPDATE_SCORING``).

    Yields:
        ``{"url", "info" (GET /info/), "log"}``.
    """
    port = free_port()
    log_path = workdir / "server.log"
    server_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    server_env.setdefault("OMP_NUM_THREADS", "1")  # see tests/conftest.py: shared cores
    server_env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
    server_env.update(env or {})
    command = [
        str(python),
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
    ]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, value]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        # its own session: teardown stops the server and the training and scoring processes it starts
        process = subprocess.Popen(
            command, cwd=workdir, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        info = None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited ({process.returncode}):\n{log_tail(log_path)}"
            try:
                status, content = http("GET", f"{url}/info/", timeout=10)
                if status == 200:
                    info = json.loads(content)
                    break
            except OSError:
                pass
            time.sleep(2)
        assert info is not None, f"server not up in {SERVER_START_TIMEOUT_S} s:\n{log_tail(log_path)}"
        yield {"url": url, "info": info, "log": log_path}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        try:  # background task processes left in the session
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
