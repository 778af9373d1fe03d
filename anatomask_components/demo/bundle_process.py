"""``python -m monai.bundle run`` without paying for the imports at every stage.

The demo runs thirteen bundle stages. A fresh interpreter spends about 6 s (2-core CPU) importing torch, MONAI
and ignite before it reads a config: about 80 s of a quick demo. A :class:`StageServer` is one interpreter
that imports them once and then forks a process per stage, so each stage still has its own memory, logging,
seeds, environment and working directory, and calls what the command calls,
``monai.bundle.scripts.run(config_file=..., meta_file=..., logging_file=...)``. The server waits for each
stage with ``wait4``, so the exit code and peak RSS come from the kernel as for any child process.

Run as ``python -m anatomask_components.demo.bundle_process``, this module is the server: one JSON request a
line on stdin, one JSON answer a line on stdout.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["StageServer", "StageServerError", "stage_servers_available"]

# what every bundle stage imports; the server imports these once, each stage inherits them
PRELOAD = (
    "torch",
    "ignite.engine",
    "monai",
    "monai.bundle",
    "anatomask_components.data",
    "anatomask_components.handlers",
    "anatomask_components.networks",
    "anatomask_components.evaluation",
    "anatomask_components.engines",
    "anatomask_components.inference",
)
# how often the caller reads a running stage's log for progress lines, in seconds
_POLL_SECONDS = 0.2


class StageServerError(RuntimeError):
    """The stage server died or answered nonsense; the message names its log."""


def stage_servers_available() -> bool:
    """Whether this platform can fork (not on Windows)."""
    return hasattr(os, "fork")


class StageServer:
    """An interpreter with torch and MONAI imported that runs bundle stages in forked processes.

    Use as a context manager; :meth:`run` one stage at a time.

    Args:
        log_path: the server's own stdout/stderr (import warnings, a crash of the server itself).
    """

    def __init__(self, log_path: str | os.PathLike) -> None:
        self.log_path = Path(log_path)
        self._process: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> StageServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        return self

    def __exit__(self, *exc_info) -> None:
        if self._process is not None:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass  # the server died; it is waited for below
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process.stdout.close()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def run(
        self,
        folder: str | os.PathLike,
        config_files: Sequence[str],
        log_path: str | os.PathLike,
        on_line: Callable[[str], None],
        environment: Mapping[str, str] | None = None,
    ) -> tuple[int, int]:
        """Run a bundle's configs in a forked process, following its log.

        Args:
            folder: the bundle folder (the stage's working directory).
            config_files: config files relative to ``folder`` (or absolute), merged in order.
            log_path: file that receives the stage's stdout and stderr (created empty first).
            on_line: called with each line of the log as it is written.
            environment: the stage's environment variables (default: this process's).

        Returns:
            ``(exit code, peak RSS in KiB)`` of the stage's process.

        Raises:
            StageServerError: the server is not running or died.
        """
        if self._process is None:
            raise StageServerError("the stage server is not started: use it as a context manager")
        log_path = Path(log_path)
        log_path.write_text("", encoding="utf-8")
        request = {
            "folder": str(folder),
            "config_files": list(config_files),
            "log": str(log_path),
            "environment": dict(os.environ if environment is None else environment),
        }
        try:
            self._process.stdin.write((json.dumps(request) + "\n").encode())
        except BrokenPipeError as error:
            raise self._died() from error
        answer = b""
        pending = ""
        with open(log_path, encoding="utf-8", errors="replace") as log:
            while not answer.endswith(b"\n"):
                ready, _, _ = select.select([self._process.stdout], [], [], _POLL_SECONDS)
                if ready:
                    chunk = os.read(self._process.stdout.fileno(), 4096)
                    if not chunk:
                        raise self._died()
                    answer += chunk
                pending = _follow(log, pending, on_line)
            pending = _follow(log, pending, on_line)
        if pending:
            on_line(pending)
        try:
            result = json.loads(answer)
            return int(result["exit_code"]), int(result["peak_rss_kib"])
        except (ValueError, KeyError) as error:
            raise StageServerError(
                f"the stage server answered {answer!r}; its log: {self.log_path}"
            ) from error

    def _died(self) -> StageServerError:
        code = self._process.poll()
        return StageServerError(f"the stage server exited (code {code}); its log: {self.log_path}")


def _follow(log, pending: str, on_line: Callable[[str], None]) -> str:
    """Hand the complete new lines of ``log`` to ``on_line``; returns the incomplete rest."""
    *lines, pending = (pending + log.read()).split("\n")
    for line in lines:
        on_line(line + "\n")
    return pending


def _stage(request: dict[str, Any]) -> int:
    """In the forked process: stdout and stderr into the stage's log, the caller's environment, the bundle's
    folder as working directory, then ``monai.bundle.scripts.run``. Returns the exit code."""
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    os.environ.clear()
    os.environ.update(request["environment"])
    os.chdir(request["folder"])
    warnings.simplefilter("ignore")
    config_files = request["config_files"]
    try:
        from monai.bundle.scripts import run

        run(
            config_file=config_files[0] if len(config_files) == 1 else config_files,
            meta_file="configs/metadata.json",
            logging_file="configs/logging.conf",
        )
        return 0
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the log gets any failure, the caller its exit code
        traceback.print_exc()
        return 1
    finally:
        # the process ends with os._exit (not the server's exit handlers): flush what a normal exit would
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    """The server's loop: import :data:`PRELOAD`, then fork one stage per request line until stdin closes."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    # stray prints of the imports or of a stage must not reach the answers
    os.dup2(2, 1)
    for module in PRELOAD:
        importlib.import_module(module)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                answers.close()
                code = _stage(request)
            finally:
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        answer = {"exit_code": os.waitstatus_to_exitcode(status), "peak_rss_kib": usage.ru_maxrss}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    serve()
