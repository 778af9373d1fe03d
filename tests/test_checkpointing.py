"""TrainingCheckpointer and PretrainedExporter: a folder of another run, corrupt checkpoints, leftovers."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from anatomask_components.checkpointing import (
    PretrainedExporter,
    TrainingCheckpointer,
    atomic_save,
    find_checkpoints,
    latest_checkpoint,
)

EPOCH_LENGTH = 2


def _run(
    save_dir: Path, max_epochs: int, only_start: bool = False, seed: int = 0, **options
) -> tuple[Engine, torch.nn.Module, TrainingCheckpointer]:
    """Train a linear model with a checkpoint every iteration; ``only_start``: stop right after resuming."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [torch.full((4, 3), float(i + 1)) for i in range(EPOCH_LENGTH)]

    def step(engine: Engine, batch: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    checkpointer = TrainingCheckpointer(
        save_dir, {"model": model, "optimizer": optimizer}, save_every_iterations=1, **options
    )
    checkpointer.attach(engine)
    if only_start:
        engine.add_event_handler(Events.STARTED, lambda e: e.terminate())
    engine.run(data, max_epochs=max_epochs)
    return engine, model, checkpointer


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _saved_model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_checkpoints_are_listed_newest_first(tmp_path):
    for name in ("checkpoint_9.pt", "checkpoint_10.pt", "checkpoint_2.pt", "checkpoint_x.pt", "other.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_checkpoints(tmp_path)] == [
        "checkpoint_10.pt",
        "checkpoint_9.pt",
        "checkpoint_2.pt",
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_10.pt"
    assert find_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None


def test_fresh_run_refuses_a_folder_with_checkpoints_of_another_run(tmp_path):
    _run(tmp_path, max_epochs=3)  # the older run: checkpoint_5.pt, checkpoint_6.pt
    assert _names(tmp_path) == ["checkpoint_5.pt", "checkpoint_6.pt"]
    with pytest.raises(FileExistsError) as error:
        _run(tmp_path, max_epochs=1, resume=False)
    message = str(error.value)
    for part in (str(tmp_path), "checkpoint_6.pt", "--resume true", "--ckpt_dir", "delete"):
        assert part in message
    assert _names(tmp_path) == ["checkpoint_5.pt", "checkpoint_6.pt"]  # untouched
    # an empty (or missing) folder is fine
    engine, _, _ = _run(tmp_path / "fresh", max_epochs=1, resume=False)
    assert engine.state.iteration == 2 and _names(tmp_path / "fresh") == [
        "checkpoint_1.pt",
        "checkpoint_2.pt",
    ]


def test_pruning_never_deletes_checkpoints_of_this_run(tmp_path):
    """A checkpoint of another run with a higher iteration appears mid-run: this run keeps its own."""
    foreign = tmp_path / "checkpoint_100.pt"

    def drop_foreign(engine: Engine) -> None:
        atomic_save({"from": "another run"}, foreign)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    engine = Engine(lambda e, b: 0.0)
    TrainingCheckpointer(tmp_path, {"model": model}, save_every_iterations=1, keep_last=2).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), drop_foreign)
    engine.run([0] * EPOCH_LENGTH, max_epochs=3)
    assert _names(tmp_path) == ["checkpoint_100.pt", "checkpoint_5.pt", "checkpoint_6.pt"]
    assert torch.load(foreign, weights_only=True) == {"from": "another run"}


def test_resume_from_an_older_checkpoint_keeps_the_newer_ones_of_the_folder(tmp_path, caplog):
    _run(tmp_path, max_epochs=3, keep_last=10)  # checkpoint_1 ... checkpoint_6
    caplog.set_level(logging.INFO, logger="anatomask_components.checkpointing")
    engine, _, _ = _run(tmp_path, max_epochs=2, keep_last=2, resume_from=tmp_path / "checkpoint_2.pt")
    assert engine.state.iteration == 4
    # this run: checkpoint_1, 2 (its history), 3, 4 (written) -> the last two kept; 5 and 6 are not its own
    assert _names(tmp_path) == ["checkpoint_3.pt", "checkpoint_4.pt", "checkpoint_5.pt", "checkpoint_6.pt"]
    assert "overwriting" in caplog.text and "checkpoint_3.pt" in caplog.text


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    _run(tmp_path, max_epochs=2, keep_last=3)  # checkpoint_2, 3, 4
    at_3 = _saved_model(tmp_path / "checkpoint_3.pt")
    newest = tmp_path / "checkpoint_4.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk or a copy cut short

    caplog.set_level(logging.WARNING, logger="anatomask_components.checkpointing")
    engine, model, _ = _run(tmp_path, max_epochs=2, only_start=True)
    assert engine.state.iteration == 3
    assert all(torch.equal(model.state_dict()[k], at_3[k]) for k in at_3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("checkpoint_4.pt" in r.getMessage() for r in warnings)
    assert "checkpoint_4.pt.corrupt" in _names(tmp_path) and not newest.exists()

    # the next start does not try it again; training goes on and writes a new checkpoint_4
    caplog.clear()
    engine, _, _ = _run(tmp_path, max_epochs=2)
    assert engine.state.iteration == 4 and not caplog.records
    assert _names(tmp_path) == ["checkpoint_3.pt", "checkpoint_4.pt", "checkpoint_4.pt.corrupt"]
    torch.load(tmp_path / "checkpoint_4.pt", weights_only=True)


def test_garbage_newest_checkpoint_is_skipped_too(tmp_path):
    _run(tmp_path, max_epochs=2, keep_last=3)
    (tmp_path / "checkpoint_4.pt").write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "checkpoint_3.pt").write_bytes(b"")
    at_2 = _saved_model(tmp_path / "checkpoint_2.pt")
    engine, model, _ = _run(tmp_path, max_epochs=2, only_start=True)
    assert engine.state.iteration == 2
    assert all(torch.equal(model.state_dict()[k], at_2[k]) for k in at_2)
    assert _names(tmp_path) == ["checkpoint_2.pt", "checkpoint_3.pt.corrupt", "checkpoint_4.pt.corrupt"]


def test_no_readable_checkpoint_raises_and_lists_them(tmp_path):
    for name in ("checkpoint_2.pt", "checkpoint_4.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="none of the 2 checkpoint") as error:
        _run(tmp_path, max_epochs=1)
    assert "checkpoint_2.pt" in str(error.value) and "checkpoint_4.pt" in str(error.value)
    assert str(tmp_path) in str(error.value)
    assert _names(tmp_path) == ["checkpoint_2.pt", "checkpoint_4.pt"]  # left as they are: raises again


def test_unreadable_resume_from_raises(tmp_path):
    _run(tmp_path, max_epochs=1)
    explicit = tmp_path / "checkpoint_2.pt"
    explicit.write_bytes(explicit.read_bytes()[:50])
    with pytest.raises(RuntimeError, match=re.escape(f"cannot read checkpoint {explicit}")):
        _run(tmp_path, max_epochs=2, resume_from=explicit)
    assert explicit.exists()
    with pytest.raises(FileNotFoundError):
        _run(tmp_path, max_epochs=2, resume_from=tmp_path / "checkpoint_77.pt")


def _leftover(folder: Path, name: str) -> Path:
    """The temporary file that :func:`atomic_save` of ``name`` leaves when killed mid-write."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    with open(handle, "wb") as f:
        f.write(b"half a checkpoint")
    return Path(path)


def test_temporary_files_of_killed_saves_are_swept_at_start(tmp_path, caplog):
    _run(tmp_path, max_epochs=1)
    leftovers = [_leftover(tmp_path, "checkpoint_3.pt"), _leftover(tmp_path, "checkpoint_12.pt")]
    unrelated = _leftover(tmp_path, "notes.txt")
    caplog.set_level(logging.INFO, logger="anatomask_components.checkpointing")
    engine, _, _ = _run(tmp_path, max_epochs=2)
    assert engine.state.iteration == 4
    assert not any(p.exists() for p in leftovers) and unrelated.exists()
    assert "removed 2 temporary file(s)" in caplog.text
    assert all(p.name in caplog.text for p in leftovers)
    # a fresh run sweeps too, before deciding whether it may start
    leftover = _leftover(tmp_path / "fresh", "checkpoint_1.pt")
    _run(tmp_path / "fresh", max_epochs=1, resume=False)
    assert not leftover.exists()


def test_exporter_sweeps_its_own_temporary_files(tmp_path):
    models = tmp_path / "models"
    mine = [_leftover(models, "model.pt"), _leftover(models, "encoder.pt")]
    other = _leftover(models, "best.pt")
    exporter = PretrainedExporter(torch.nn.Linear(1, 1), models / "model.pt", models / "encoder.pt")
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.STARTED, exporter.sweep)
    engine.run([0], max_epochs=1)
    assert not any(p.exists() for p in mine) and other.exists()
