"""One training run per output folder, in the bundles: the lock comes first, and a real second
``python -m monai.bundle run`` on a held folder stops with one line naming the holder, writing nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_common import BUNDLES, configs
from monai.bundle import ConfigParser

from anatomask_components.bundle_builder import discover_bundles
from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.run_lock import LOCK_FILE, read_holder

ALL_BUNDLES = list(discover_bundles())
ACQUIRE = "$@run_lock.acquire_or_exit()"
HOLDER = """
import sys
from anatomask_components.run_lock import RunLock

lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_training_locks_first_evaluation_does_not(bundle):
    folder = configs(bundle)
    train = json.loads((folder / "train.json").read_text())
    folders = train["run_lock"]["folders"]
    assert folders[:3] == ["@output_dir", "@ckpt_dir", "$os.path.dirname(@model_path)"]
    assert train["initialize"][0] == ACQUIRE  # before anything else runs
    assert train["train"]["handlers"][0] == {
        "_target_": "anatomask_components.run_lock.RunLockHandler",
        "lock": "@run_lock",
    }
    # DDP: after the process group (the verdict is broadcast) and the device, before anything else
    multi_gpu = json.loads((folder / "multi_gpu_train.json").read_text())["initialize"]
    assert (
        multi_gpu.index(ACQUIRE) == 2
        and "init_process_group" in multi_gpu[0]
        and "set_device" in multi_gpu[1]
    )
    if (folder / "evaluate.json").exists():
        assert ACQUIRE not in json.loads((folder / "evaluate.json").read_text())["initialize"]
    for config in folder.glob("*.json"):  # references by position break when a handler is added
        assert not re.search(r"handlers#\d", config.read_text()), config.name


def test_pretraining_teacher_handler_is_the_teacher():
    folder = configs("anatomask_pretrain")
    parser = ConfigParser()
    parser.read_config([str(folder / "train.json"), str(folder / "small_override.json")])
    handlers = parser["train"]["handlers"]
    (index,) = [i for i, h in enumerate(handlers) if h["_target_"] == "@teacher"]
    assert parser.get_parsed_content(f"train#handlers#{index}") is parser.get_parsed_content("teacher")


def _pretrain(root: Path, scans: Path) -> subprocess.CompletedProcess:
    folder = BUNDLES / "anatomask_pretrain" / "configs"
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", json.dumps([str(folder / "train.json"), str(folder / "small_override.json")]),
        "--meta_file", str(folder / "metadata.json"),
        "--logging_file", str(folder / "logging.conf"),
        "--bundle_root", str(root),
        "--dataset_dir", str(scans),
        "--roi_size", "[32, 32, 32]", "--batch_size", "1", "--max_epochs", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_second_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    scans = tmp_path / "scans"
    write_phantom_dataset(scans, n_cases=2, shape=(40, 40, 44), layout="folder", seed=3)
    root = tmp_path / "bundle"
    output_dir = root / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        written = read_holder(output_dir / LOCK_FILE)
        refused = _pretrain(root, scans)
        assert refused.returncode == 1
        assert refused.stderr.rstrip().splitlines()[-1] == (
            f"error: {output_dir} is in use by another training run (pid {holder.pid} on host "
            f"{socket.gethostname()}, started {written['started']}, command: {written['command']}); wait for "
            "it to end, or give this run folders of its own (output_dir, ckpt_dir, model_path). Lock file: "
            f"{output_dir / LOCK_FILE}"
        )
        assert sorted(p.name for p in output_dir.iterdir()) == [LOCK_FILE]  # nothing written
        assert not (root / "models").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)

    done = _pretrain(root, scans)
    assert done.returncode == 0, done.stderr[-3000:]
    taken_over = f"{output_dir}: taking over the lock left by a training run that is no longer running"
    assert f"{taken_over} (pid {holder.pid} " in done.stdout + done.stderr
    assert (root / "models" / "model.pt").is_file() and (
        output_dir / "checkpoints" / "checkpoint_2.pt"
    ).is_file()
    assert not list(root.rglob(LOCK_FILE))  # released at the end
