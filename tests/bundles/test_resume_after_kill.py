"""Resume after a crash: fine-tuning keeps its best model, and pretraining killed with SIGKILL mid-epoch
(restarted with the same command) ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_common import BUNDLES, configs, workflow
from ignite.engine import Events

from anatomask_components.bundle_builder import finetune_bundles
from anatomask_components.checkpointing import find_checkpoints
from anatomask_components.data.phantoms import write_phantom_dataset

FINETUNE_BUNDLES = list(finetune_bundles())


def _handler_names(bundle: str) -> list[str]:
    handlers = json.loads((configs(bundle) / "train.json").read_text())["train"]["handlers"]
    return [h["_target_"].rsplit(".", 1)[-1] for h in handlers]


@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_finetune_checkpoint_is_written_after_validation(bundle):
    """Handlers of an event run in attachment order: the epoch's checkpoint must see its validation."""
    names = _handler_names(bundle)
    assert names[0] == "RunLockHandler"  # the folders are the run's before any handler writes there
    assert names[1] == "PretrainedWeightsLoader"  # its STARTED runs before the resume
    assert names[-2:] == ["StatsHandler", "TensorBoardStatsHandler"]  # sliced off on ranks > 0 (DDP)
    checkpointer = names.index("TrainingCheckpointer")
    assert names.index("ValidationHandler") < checkpointer
    assert names.index("LrScheduleHandler") < checkpointer
    assert checkpointer == len(names) - 3


class _Crash(RuntimeError):
    """Raised by the test to stop training the hard way."""


def _finetune(root: Path, datalist: Path, crash: bool, max_epochs: int) -> dict[str, Any]:
    """Fine-tune FLARE22 with the small override, one validation per epoch.

    With ``crash``, raise right after the first epoch (from the second on) whose validation improved, after
    every bundle handler of that epoch (validation, checkpoint) ran.
    """
    flow = workflow(
        "anatomask_finetune_flare22",
        ["train.json", "small_override.json"],
        "train",
        bundle_root=str(root),
        dataset_dir=str(datalist),
        max_epochs=max_epochs,
        learning_rate=0.01,  # the validation Dice moves from epoch to epoch (up, then down on phantoms)
    )
    trainer = flow.parser.get_parsed_content("train#trainer")
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    saver = flow.parser.get_parsed_content("validate#best_model_saver")
    network = flow.parser.get_parsed_content("network")
    result: dict[str, Any] = {"validations": [], "saver": saver}

    def resumed(engine) -> None:  # after the bundle's STARTED handlers, i.e. after the resume
        result.update(start_iteration=engine.state.iteration, best_at_start=saver.best)

    def validated(engine) -> None:
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        result["validations"].append(
            (trainer.state.epoch, float(engine.state.metrics["val_mean_dice"]), state)
        )

    best_before = {}

    def crash_if_improved(engine) -> None:
        if engine.state.epoch >= 2 and saver.best != best_before["best"]:
            result["crashed_after_epoch"] = engine.state.epoch
            raise _Crash(f"killed after epoch {engine.state.epoch}")

    trainer.add_event_handler(Events.STARTED, resumed)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, validated)
    if crash:
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: best_before.update(best=saver.best))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, crash_if_improved)
        with pytest.raises(RuntimeError) as error:  # MONAI wraps the exception of a config expression
            flow.run()
        cause: BaseException | None = error.value
        while cause is not None and not isinstance(cause, _Crash):
            cause = cause.__cause__
        assert cause is not None, error.value
    else:
        flow.run()
    return result


@pytest.mark.slow
def test_finetune_resumed_after_a_crash_keeps_the_best_model(tmp_path):
    datalist = write_phantom_dataset(
        tmp_path / "dataset", n_cases=3, shape=(40, 40, 40), num_classes=14, fractions=(0.34, 0.33, 0.33)
    )
    assert [len(datalist[s]) for s in ("training", "validation")] == [1, 1]
    datalist_path = tmp_path / "dataset" / "datalist.json"
    root = tmp_path / "run"
    max_epochs = 5
    first = _finetune(root, datalist_path, crash=True, max_epochs=max_epochs)
    crashed = first["crashed_after_epoch"]
    assert crashed < max_epochs, "no validation improved before the last epoch; nothing to test"
    metrics = [m for _, m, _ in first["validations"]]
    assert len(metrics) == crashed and not any(math.isnan(m) for m in metrics)
    assert metrics[-1] > max(metrics[:-1])  # the crash came right after an improvement

    second = _finetune(root, datalist_path, crash=False, max_epochs=max_epochs)
    # the checkpoint of the crashed epoch was written after its validation: the resumed run knows its best
    assert second["start_iteration"] == crashed * 2
    assert second["best_at_start"] == metrics[-1]

    validations = first["validations"] + second["validations"]
    assert [epoch for epoch, _, _ in validations] == list(range(1, max_epochs + 1))
    best_value = max(m for _, m, _ in validations)
    best_epoch, _, best_state = next(v for v in validations if v[1] == best_value)
    assert second["saver"].best == best_value
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    assert list(saved) == list(best_state)
    assert all(torch.equal(saved[k], best_state[k]) for k in saved), f"model.pt is not epoch {best_epoch}'s"


# --- pretraining killed with SIGKILL ---

PRETRAIN = BUNDLES / "anatomask_pretrain"
ITERATIONS = 6  # 3 epochs of 2 scans, batch size 1
KILL_AFTER = (3, 5)  # kill once a checkpoint of at least this iteration exists (mid-epoch 2, mid-epoch 3)


def _pretrain_command(root: Path, override: Path) -> list[str]:
    folder = PRETRAIN / "configs"
    config_files = [str(folder / "train.json"), str(folder / "small_override.json"), str(override)]
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", json.dumps(config_files),
        "--meta_file", str(folder / "metadata.json"),
        "--logging_file", str(folder / "logging.conf"),
        "--bundle_root", str(root),
    ]  # fmt: skip


def _newest_iteration(folder: Path) -> int:
    found = find_checkpoints(folder)
    return int(found[0].name[len("checkpoint_") : -len(".pt")]) if found else 0


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _trained_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = torch.load(root / "runs" / "checkpoints" / f"checkpoint_{ITERATIONS}.pt", weights_only=True)
    return {
        "model.pt": torch.load(root / "models" / "model.pt", weights_only=True),
        "encoder.pt": torch.load(root / "models" / "encoder.pt", weights_only=True),
        "teacher": checkpoint["teacher"]["teacher"],
        "student": checkpoint["student"],
    }


@pytest.mark.slow
def test_pretraining_killed_mid_epoch_resumes_bit_identical(tmp_path):
    scans = tmp_path / "scans"
    write_phantom_dataset(scans, n_cases=2, shape=(40, 40, 44), layout="folder", seed=3)
    override = tmp_path / "test_override.json"
    override.write_text(
        json.dumps(
            {
                "dataset_dir": str(scans),
                "roi_size": [32, 32, 32],
                "batch_size": 1,
                "num_workers": 0,
                "max_epochs": ITERATIONS // 2,
                "hard_ratio_start": 0.5,
                "hard_ratio_end": 0.5,
                "save_every_iterations": 1,
                "progress_every_iterations": 1,
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight_log = tmp_path / "straight.log"
    # the uninterrupted run, alongside the first start of the one that is killed
    with open(straight_log, "w") as log:
        reference = subprocess.Popen(
            _pretrain_command(straight, override), stdout=log, stderr=subprocess.STDOUT, env=env
        )

    ckpt_dir = killed / "runs" / "checkpoints"
    kills: list[int] = []
    for start in range(len(KILL_AFTER) + 1):
        log_path = tmp_path / f"killed_{start}.log"
        if start == len(KILL_AFTER):
            # before the last start, also what a kill can leave on other file systems or disks: a newest
            # checkpoint cut short (the run falls back to the one before) and a temporary file of a save
            corrupt = find_checkpoints(ckpt_dir)[0]
            corrupt.write_bytes(corrupt.read_bytes()[:1000])
            handle, leftover = tempfile.mkstemp(prefix=".checkpoint_99.pt.", suffix=".tmp", dir=ckpt_dir)
            os.close(handle)
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                _pretrain_command(killed, override), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if start < len(KILL_AFTER):
            deadline = time.monotonic() + 300
            while _newest_iteration(ckpt_dir) < KILL_AFTER[start] and process.poll() is None:
                assert time.monotonic() < deadline, _tail(log_path)
                time.sleep(0.02)
            assert process.poll() is None, "finished before it could be killed:\n" + _tail(log_path)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
            kills.append(_newest_iteration(ckpt_dir))
            assert not (killed / "models" / "model.pt").exists()  # killed before the end
        else:
            assert process.wait(timeout=300) == 0, _tail(log_path)
            log = log_path.read_text()
            assert f"cannot read checkpoint {corrupt}" in log and f"renamed to {corrupt.name}.corrupt" in log
            assert "removed 1 temporary file(s)" in log and Path(leftover).name in log
            assert "resumed from" in log
            # the killed run's lock files were left behind and are taken over
            assert f"{killed / 'runs'}: taking over the lock left by a training run that is no longer" in log
    assert reference.wait(timeout=300) == 0, _tail(straight_log)
    assert not list(killed.rglob(".training.lock"))
    assert kills[0] < ITERATIONS and kills[1] < ITERATIONS, kills

    # keep_last 2 of this run's checkpoints, the unreadable one set aside, no temporary file left
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(
        [f"checkpoint_{ITERATIONS - 1}.pt", f"checkpoint_{ITERATIONS}.pt", f"{corrupt.name}.corrupt"]
    )
    expected, got = _trained_tensors(straight), _trained_tensors(killed)
    for name, tensors in expected.items():
        assert list(got[name]) == list(tensors), name
        different = [k for k in tensors if not torch.equal(tensors[k], got[name][k])]
        assert not different, f"{name}: {different[:5]} differ after the kills at {kills}"
