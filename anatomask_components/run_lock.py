"""One training run per output folder: a lock file that names its holder.

A training run locks every folder it writes (output, checkpoints, the exported model) before it writes
anything: a second run on one of them refuses to start and names the first (pid, host, start time,
command), instead of interleaving its checkpoints with the first's.

How a lock works: ``<folder>/.training.lock`` is opened and locked with ``fcntl.flock``, and the holder's
details are written into it. The kernel releases a ``flock`` when its process dies, even by ``kill -9``, so
the lock of a dead run is never mistaken for a live one on the host that ran it. A run that ends (or whose
lock object is garbage collected, or whose interpreter exits) deletes the file. The rule for a file that
is left behind:

- written on this host: its run is gone (the ``flock`` is free), so a new run takes the lock over, with a
  warning naming the old holder; a ``kill -9`` followed by a resume needs nothing else;
- written on another host: the kernel here cannot tell whether that run still lives (a network file
  system may not share locks between hosts), so the run refuses, names the holder and says which file to
  delete once that run has ended;
- on a file system without ``flock`` (e.g. Lustre mounted without it) the pid in the file decides on the
  same host: alive, refuse; gone, take over.

Only training takes the lock: evaluation and inference write into their own folders and may read a
training run's checkpoints while it goes on. With DDP only rank 0 touches the files; every rank waits for
its verdict (a broadcast), so no rank starts writing before the lock is held, and all of them stop if it is
refused. The preprocessing cache (``cache_dir``, shared by the runs of a machine) is not part of the lock.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import os
import shlex
import socket
import sys
import time
import weakref
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["LOCK_FILE", "FolderInUseError", "RunLock", "RunLockHandler", "describe_holder", "read_holder"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".training.lock"
# errors of flock on file systems that do not implement it (NFS mounted nolock, Lustre without flock, FUSE)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# how long a refused run waits for the holder to finish writing its details into a fresh lock file
_HOLDER_WAIT_SECONDS = 2.0
_MAX_COMMAND_CHARS = 300
# how long a run waits for the children of a killed holder (data loader workers share its flock) to exit
_ORPHAN_WAIT_SECONDS = 30.0


class FolderInUseError(RuntimeError):
    """Another training run holds the folder's lock."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder_details() -> dict[str, Any]:
    # one line, so that a refusal stays one line
    command = " ".join(shlex.join(getattr(sys, "orig_argv", sys.argv)).split())
    if len(command) > _MAX_COMMAND_CHARS:
        command = command[: _MAX_COMMAND_CHARS - 3] + "..."
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
    }


def _parse_holder(text: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def read_holder(lock_file: str | os.PathLike) -> dict[str, Any] | None:
    """The details a lock file holds (``pid``, ``host``, ``started``, ``command``), or None if it is missing,
    empty or unreadable."""
    try:
        return _parse_holder(Path(lock_file).read_bytes())
    except OSError:
        return None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host gpu1, started 2026-12-05 00:50:01 UTC, command: python -m monai.bundle run ...``."""
    if holder is None:
        return "a run that has not written its details"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return f"{text}, command: {holder['command']}" if holder.get("command") else text


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _unlock(fd: int, path: Path, owner: int) -> None:
    """Delete the lock file (if it is still ours) and close it, which releases the flock.

    A forked child (a data loader worker) that shares the descriptor only closes its copy.
    """
    try:
        if os.getpid() == owner and _same_file(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


class _FolderLock:
    """The lock of one folder (main process only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._release: weakref.finalize | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        collected = False
        orphans_deadline = time.monotonic() + _ORPHAN_WAIT_SECONDS
        for _ in range(1000):  # loops only while a run releases the file, or a dead run's children exit
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                has_flock = True
            except BlockingIOError:
                holder = self._wait_for_holder(fd)
                os.close(fd)
                if not collected and holder is not None and holder["pid"] == os.getpid():
                    # held by this process: maybe an ended run whose lock is garbage not yet collected
                    collected = True
                    gc.collect()
                    continue
                if self._dead_on_this_host(holder) and time.monotonic() < orphans_deadline:
                    # the holder was killed, but forked children (data loader workers) share its lock until
                    # they notice and exit
                    time.sleep(0.2)
                    continue
                raise FolderInUseError(self._in_use_message(holder)) from None
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                has_flock = False
            if not _same_file(fd, self.path):  # unlinked by a run that released it meanwhile
                os.close(fd)
                continue
            try:
                self._take(fd, has_flock)
            except BaseException:
                os.close(fd)
                raise
            self._release = weakref.finalize(self, _unlock, fd, self.path, os.getpid())
            return
        raise FolderInUseError(f"{self.folder}: could not lock {self.path}, other runs keep replacing it")

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def _wait_for_holder(self, fd: int) -> dict[str, Any] | None:
        deadline = time.monotonic() + _HOLDER_WAIT_SECONDS
        while (holder := _parse_holder(_read_fd(fd))) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return holder

    @staticmethod
    def _dead_on_this_host(holder: dict[str, Any] | None) -> bool:
        if holder is None or holder.get("host") != socket.gethostname():
            return False
        return not _pid_alive(holder["pid"])

    def _in_use_message(self, holder: dict[str, Any] | None) -> str:
        if self._dead_on_this_host(holder):
            return (
                f"{self.folder} is locked by processes that a killed training run left behind (the run: "
                f"{describe_holder(holder)}); end them (e.g. its data loader workers) and start again. "
                f"Lock file: {self.path}"
            )
        return (
            f"{self.folder} is in use by another training run ({describe_holder(holder)}); wait for it to "
            "end, or give this run folders of its own (output_dir, ckpt_dir, model_path). "
            f"Lock file: {self.path}"
        )

    def _take(self, fd: int, has_flock: bool) -> None:
        """Holding the flock (or without flock support): judge what an earlier run left, then sign."""
        previous = _parse_holder(_read_fd(fd))
        this_host = socket.gethostname()
        if previous is not None:
            if previous.get("host") != this_host:
                raise FolderInUseError(
                    f"{self.folder} is locked by a training run on another host "
                    f"({describe_holder(previous)}); this host cannot tell whether it still runs. If it has "
                    f"ended, delete {self.path} and start again."
                )
            if not has_flock and previous["pid"] != os.getpid() and _pid_alive(previous["pid"]):
                raise FolderInUseError(self._in_use_message(previous))
            logger.warning(
                "%s: taking over the lock left by a training run that is no longer running (%s)",
                self.folder,
                describe_holder(previous),
            )
        elif not has_flock:
            logger.warning(
                "%s: the file system does not support flock; the lock relies on the pid in %s",
                self.folder,
                self.path,
            )
        details = (json.dumps(_holder_details()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, details, 0)
        os.fsync(fd)


class RunLock:
    """The lock of a training run on the folders it writes; see the module docstring for the rules.

    Acquire it before anything is written into the folders (the bundles do it first thing in
    ``initialize``); it is released by :meth:`release`, when the training completes
    (:class:`RunLockHandler`), when the object is garbage collected and when the interpreter exits. Folders
    are deduplicated; each holds its own lock file.

    Args:
        folders: the folders of the run, e.g. output, checkpoint and model folders.
    """

    def __init__(self, folders: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        if isinstance(folders, str | os.PathLike):
            folders = [folders]
        unique: dict[Path, Path] = {}
        for folder in folders:
            unique.setdefault(Path(folder).resolve(), Path(folder))
        self.folders = list(unique.values())
        self._locks = [_FolderLock(Path(os.path.abspath(folder))) for folder in self.folders]
        self.held = False

    def acquire(self) -> None:
        """Lock every folder (rank 0), or none; does nothing if this object holds them already.

        Raises:
            FolderInUseError: another run holds one of the folders (on every rank under DDP).
        """
        if self.held:
            return
        failure: Exception | None = None
        if not _distributed() or torch.distributed.get_rank() == 0:
            try:
                for lock in self._locks:
                    lock.acquire()
            except Exception as err:  # any failure must reach the other ranks, or they wait forever
                for lock in self._locks:
                    lock.release()
                failure = err
        if _distributed():
            verdict = [None if failure is None else str(failure)]
            torch.distributed.broadcast_object_list(verdict, src=0)
            if failure is None and verdict[0] is not None:
                failure = FolderInUseError(verdict[0])
        if failure is not None:
            raise failure
        self.held = True
        if not _distributed() or torch.distributed.get_rank() == 0:
            logger.info("locked %s", ", ".join(str(lock.path) for lock in self._locks))

    def acquire_or_exit(self) -> None:
        """:meth:`acquire` for a command line run: a refusal ends the process with one line and exit code 1
        (``SystemExit`` passes through MONAI's wrapping of config expressions)."""
        try:
            self.acquire()
        except FolderInUseError as err:
            raise SystemExit(f"error: {err}") from None

    def release(self) -> None:
        """Unlock the folders (deleting the lock files); safe to call more than once."""
        for lock in self._locks:
            lock.release()
        self.held = False


class RunLockHandler:
    """Ignite side of a :class:`RunLock`: acquire it when training starts (a no-op if ``initialize``
    already did; needed where a runner skips ``initialize``, e.g. MONAI Label's in-process training) and
    release it when training completes, after every other ``COMPLETED`` handler has written its files, or
    when training fails with an exception (which is raised again).

    Put it first in the trainer's handlers, so that it runs before any handler writes at ``STARTED``.

    Args:
        lock: the run's lock.
    """

    def __init__(self, lock: RunLock) -> None:
        self.lock = lock

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        # Ignite runs EXCEPTION_RAISED handlers until one raises (MONAI's StatsHandler re-raises): attached
        # first, this one frees the folders of a run that failed in-process (MONAI Label) and re-raises.
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def started(self, engine: Engine) -> None:
        self.lock.acquire()
        # attached now, after every handler attached at construction: it runs after their COMPLETED writes
        if not engine.has_event_handler(self.completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: Engine) -> None:
        self.lock.release()

    def failed(self, engine: Engine, error: BaseException) -> None:
        self.lock.release()
        raise error
