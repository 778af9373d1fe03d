"""TrainingProgress: the printed progress and the per-iteration JSON-lines log, across a resume."""

from __future__ import annotations

import json
import logging

import torch
from ignite.engine import Engine

from anatomask_components.handlers import TrainingProgress, read_training_log


def _engine(losses: list[float]) -> Engine:
    def step(engine, batch):
        return {"loss": torch.tensor(losses[engine.state.iteration - 1], dtype=torch.float64), "lr": 0.5}

    return Engine(step)


def test_log_holds_every_iteration_and_lines_show_time_left(tmp_path, caplog):
    losses = [float(i) / 10 for i in range(1, 7)]
    engine = _engine(losses)
    log = tmp_path / "runs" / "training_log.jsonl"
    TrainingProgress(
        log, print_every=4, output_transform=lambda o: {"loss": o["loss"], "lr": o["lr"]}
    ).attach(engine)
    with caplog.at_level(logging.INFO, logger="anatomask_components.handlers"):
        engine.run(range(3), max_epochs=2)
    entries = read_training_log(log)
    assert [e["iteration"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e["epoch"] for e in entries] == [1, 1, 1, 2, 2, 2]
    assert [e["loss"] for e in entries] == losses and all(e["lr"] == 0.5 for e in entries)
    assert all(e["seconds"] >= 0 and e["peak_rss_mb"] > 0 for e in entries)
    assert entries[-1]["elapsed"] >= entries[0]["elapsed"]
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    # the first, every 4th and the last iteration
    assert [line.split("iteration ")[1].split(",")[0] for line in printed] == ["1/6", "4/6", "6/6"]
    assert all("left " in line and "s/it" in line for line in printed)
    assert printed[-1].endswith("left 0:00")


def test_a_resumed_run_appends_and_a_fresh_run_truncates(tmp_path):
    log = tmp_path / "training_log.jsonl"
    first = _engine([1.0] * 6)
    TrainingProgress(log).attach(first)
    first.run(range(3), max_epochs=1)
    # a restart from the checkpoint of iteration 2 repeats iteration 3 with another loss
    resumed = _engine([9.0] * 6)
    TrainingProgress(log).attach(resumed)
    resumed.load_state_dict({"iteration": 2, "epoch_length": 3, "max_epochs": 2})
    resumed.run(range(3), max_epochs=2)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["iteration"] for e in lines] == [1, 2, 3, 3, 4, 5, 6]
    entries = read_training_log(log)
    assert [e["iteration"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in entries] == [1.0, 1.0, 9.0, 9.0, 9.0, 9.0]
    fresh = _engine([2.0] * 3)
    TrainingProgress(log).attach(fresh)
    fresh.run(range(3), max_epochs=1)
    assert [e["loss"] for e in read_training_log(log)] == [2.0, 2.0, 2.0]
