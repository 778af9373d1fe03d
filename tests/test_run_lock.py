"""One training run per output folder (:mod:`anatomask_components.run_lock`): a second process is refused and
told who holds the folder, the lock of a killed process is taken over, DDP takes one lock per run."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events

from anatomask_components import run_lock
from anatomask_components.run_lock import LOCK_FILE, FolderInUseError, RunLock, RunLockHandler, read_holder

# Holds the lock on the folders given as arguments until its stdin is closed.
HOLDER = """
import sys
from anatomask_components.run_lock import RunLock

lock = RunLock(sys.argv[1:])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def start_holder(*folders: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, folders)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_second_process_is_refused_and_told_the_holder(tmp_path):
    holder = start_holder(tmp_path / "runs")
    try:
        written = read_holder(tmp_path / "runs" / LOCK_FILE)
        assert written["pid"] == holder.pid and written["host"] == socket.gethostname()
        assert HOLDER.split()[0] in written["command"] and "\n" not in written["command"]
        with pytest.raises(FolderInUseError) as refused:
            RunLock([tmp_path / "runs"]).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"{tmp_path / 'runs'} is in use by another training run (pid {holder.pid} on host " in message
        assert f"started {written['started']}" in message and message.endswith(
            str(tmp_path / "runs" / LOCK_FILE)
        )
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not (tmp_path / "runs" / LOCK_FILE).exists()  # a run that ends deletes its lock file
    lock = RunLock([tmp_path / "runs"])
    lock.acquire()
    assert read_holder(tmp_path / "runs" / LOCK_FILE)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "runs" / LOCK_FILE).exists()


def test_all_folders_or_none(tmp_path):
    """One folder held elsewhere: the run takes none, and says which one is held."""
    holder = start_holder(tmp_path / "checkpoints")
    try:
        lock = RunLock([tmp_path / "runs", tmp_path / "checkpoints", tmp_path / "runs"])
        assert len(lock.folders) == 2
        with pytest.raises(FolderInUseError, match=f"^{tmp_path / 'checkpoints'} is in use"):
            lock.acquire()
        assert not (tmp_path / "runs" / LOCK_FILE).exists() and not lock.held
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert read_holder(tmp_path / LOCK_FILE)["pid"] == holder.pid  # left behind
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        lock.acquire()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "taking over the lock left by a training run that is no longer running" in warning
    assert f"pid {holder.pid} on host {socket.gethostname()}" in warning
    assert read_holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()
    lock.release()


def test_lock_written_on_another_host_is_refused(tmp_path):
    """Another host's run may live on: the file is left alone and the message says what to delete."""
    stale = {"pid": 4242, "host": "gpu-node-7", "started": "2026-12-01 10:00:00 UTC", "command": "train"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with pytest.raises(FolderInUseError) as refused:
        RunLock(tmp_path).acquire()
    assert str(refused.value) == (
        f"{tmp_path} is locked by a training run on another host (pid 4242 on host gpu-node-7, started "
        "2026-12-01 10:00:00 UTC, command: train); this host cannot tell whether it still runs. If it has "
        f"ended, delete {tmp_path / LOCK_FILE} and start again."
    )
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == stale


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, caplog):
    """File systems without flock (Lustre, NFS mounted nolock): a live pid of this host refuses, a dead one
    is taken over."""

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    host = socket.gethostname()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": host}))  # alive
    with pytest.raises(
        FolderInUseError, match=f"in use by another training run \\(pid {os.getppid()} on host"
    ):
        RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": host}))
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        lock.acquire()
    assert f"no longer running (pid {dead.pid} on host {host}" in caplog.text
    assert read_holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_same_process_ended_run_is_collected_live_one_refuses(tmp_path, caplog):
    """In one process (MONAI Label trains in-process): the lock of an ended run that only the garbage
    collector can free is freed; a live one refuses."""
    ended = RunLock(tmp_path)
    ended.acquire()
    cycle: list = [ended]
    cycle.append(cycle)
    del ended, cycle
    second = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        second.acquire()
    # deleted by the collected lock, not taken over (earlier tests may have set INFO logging: ignore "locked")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(FolderInUseError, match=f"pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    second.release()


def test_handler_holds_the_lock_through_the_run(tmp_path):
    """Acquired at STARTED (runners that skip ``initialize``), released after the other COMPLETED handlers
    have written their files."""
    lock = RunLock(tmp_path)
    engine = Engine(lambda engine, batch: None)
    RunLockHandler(lock).attach(engine)
    seen = []
    engine.add_event_handler(Events.STARTED, lambda e: seen.append(read_holder(tmp_path / LOCK_FILE)["pid"]))
    engine.add_event_handler(Events.COMPLETED, lambda e: seen.append((tmp_path / LOCK_FILE).exists()))
    engine.run([0, 1], max_epochs=2)
    assert seen == [os.getpid(), True]
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()
    engine.run([0, 1], max_epochs=2)  # a second run of the engine locks again and releases once
    assert seen == [os.getpid(), True] * 2


def test_handler_frees_the_folder_of_a_run_that_failed_in_process(tmp_path):
    """A training that raises inside a long-lived process (MONAI Label) frees its folders at once, even
    while its lock object is still referenced, and the exception still reaches the caller after MONAI's
    StatsHandler, attached later, would have logged it."""
    from monai.handlers import StatsHandler

    def crash(engine, batch):
        raise RuntimeError("out of memory in the forward pass")

    lock = RunLock(tmp_path)
    engine = Engine(crash)
    RunLockHandler(lock).attach(engine)
    StatsHandler(name="failed_run").attach(engine)
    with pytest.raises(RuntimeError, match="out of memory in the forward pass"):
        engine.run([0, 1], max_epochs=1)
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()
    retry = RunLock(tmp_path)
    retry.acquire()  # the next training of the same app on the same folder starts
    retry.release()


def _ddp_rank(rank: int, folder: Path, init_file: Path, results: Path) -> None:
    """Rank 0 holds the folder through another lock of its own, then lets go; each rank records what
    happened."""
    other = RunLock(folder)
    if rank == 0:
        other.acquire()  # before the process group: a plain lock, like a concurrent run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    record: dict = {"pid": os.getpid()}
    lock = RunLock(folder)
    try:
        lock.acquire()
    except FolderInUseError as err:
        record["refused"] = str(err)
    if rank == 0:
        other.release()
    dist.barrier()
    lock.acquire()
    dist.barrier()
    record["holder"] = read_holder(folder / LOCK_FILE)["pid"]
    record["lock_files"] = sorted(p.name for p in folder.iterdir())
    dist.barrier()
    lock.release()
    dist.destroy_process_group()
    (results / f"{rank}.json").write_text(json.dumps(record))


def test_ddp_takes_one_lock_per_run(tmp_path):
    """Rank 0 alone holds the lock; a refusal reaches every rank with the same message."""
    folder, results = tmp_path / "runs", tmp_path / "results"
    folder.mkdir()
    results.mkdir()
    mp.spawn(_ddp_rank, args=(folder, tmp_path / "init", results), nprocs=2, join=True)
    rank0, rank1 = (json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["refused"] == rank1["refused"]
    assert f"is in use by another training run (pid {rank0['pid']} on host" in rank0["refused"]
    assert rank0["holder"] == rank1["holder"] == rank0["pid"]
    assert rank0["lock_files"] == [LOCK_FILE]
    assert not (folder / LOCK_FILE).exists()
