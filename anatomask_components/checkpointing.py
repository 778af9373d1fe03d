"""Atomic checkpoints, exact resume and the pretrained-weights export of a training run."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from anatomask_components.files import atomic_write
from anatomask_components.teacher import unwrap_model

__all__ = [
    "PretrainedExporter",
    "TrainingCheckpointer",
    "atomic_save",
    "find_checkpoints",
    "is_main_process",
    "latest_checkpoint",
    "sweep_temporary_files",
]

logger = logging.getLogger(__name__)
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
# atomic_save's temporary files (files.atomic_path): "." + name + "." + mkstemp's random letters + ".tmp"
_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]+\.tmp$")
CORRUPT_SUFFIX = ".corrupt"


def is_main_process() -> bool:
    """Whether this is rank 0 of a distributed run, or the only process (the one that writes files)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: never a half-written file.

    A process killed while writing leaves the temporary file ``.<name>.<random>.tmp`` next to ``path``
    (:func:`anatomask_components.files.atomic_write`); :func:`sweep_temporary_files` removes such leftovers.
    """
    return atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


def sweep_temporary_files(
    folder: str | os.PathLike, target: Callable[[str], bool] | None = None
) -> list[Path]:
    """Delete the temporary files of :func:`atomic_save` that a killed process left in ``folder``.

    Only call it when no save into ``folder`` is in progress (e.g. when a run starts, main process only).

    Args:
        folder: the folder to clean; a missing folder is fine.
        target: only sweep the temporary files of targets whose file name passes this test (default: all).

    Returns:
        the deleted files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    swept = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY_RE.match(path.name)
        if match and path.is_file() and (target is None or target(match.group("name"))):
            path.unlink(missing_ok=True)
            swept.append(path)
    if swept:
        logger.info(
            "removed %d temporary file(s) left by an interrupted save in %s: %s",
            len(swept),
            folder,
            ", ".join(p.name for p in swept),
        )
    return swept


def _checkpoint_iteration(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def find_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint_<iteration>.pt`` files of ``folder``, newest (highest iteration) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(i, p) for p in folder.iterdir() if (i := _checkpoint_iteration(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The ``checkpoint_<iteration>.pt`` with the highest iteration in ``folder``, if any."""
    found = find_checkpoints(folder)
    return found[0] if found else None


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


class _UnreadableCheckpoint(Exception):
    """The file exists but ``torch.load`` cannot make a checkpoint of it (truncated, garbage...)."""


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` a checkpoint; raises :class:`_UnreadableCheckpoint` if the file's content is broken.

    Errors of the environment (file missing, permission denied, I/O error, out of memory) propagate as they
    are: they say nothing about the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as err:  # truncated zip (RuntimeError), garbage (UnpicklingError), empty (EOFError)...
        raise _UnreadableCheckpoint(f"{path}: {_describe(err)}") from err


class TrainingCheckpointer:
    """Saves the whole training state atomically and resumes from the newest readable checkpoint.

    The checkpoint holds ``state_dict()`` of every object in ``objects`` (student, teacher handler,
    optimiser, scheduler, iteration with its scaler...) and the trainer's counters, in a file
    ``checkpoint_<iteration>.pt`` that loads with ``weights_only=True``. Attach it after every handler
    whose state it saves: Ignite runs the handlers of an event in attachment order, and a checkpoint must
    hold the state after the iteration's scheduler step and EMA update, and after the epoch's validation
    (which updates the best metric).

    When training starts (main process only for the file operations):

    - temporary files of checkpoints that a killed save left in ``save_dir`` are deleted;
    - ``resume=False`` refuses to start if ``save_dir`` already holds checkpoints (they would mix with this
      run's and a later resume could pick them): continue them, choose another ``save_dir``, or delete them;
    - ``resume=True`` loads the newest checkpoint that can be read. Unreadable newer ones (a truncated or
      overwritten file) are logged and renamed ``<name>.corrupt`` so that they are not tried again; if no
      checkpoint can be read, it raises. An explicit ``resume_from`` that cannot be read raises.

    Pruning (``keep_last``) only deletes checkpoints of this run: those it wrote and, when it resumed from
    ``save_dir``, those of the run it continues up to the resumed iteration; never the one just written.

    Args:
        save_dir: folder of the checkpoints.
        objects: name -> object with ``state_dict``/``load_state_dict`` (networks are unwrapped).
        save_every_epochs: save at the end of every N-th epoch (0: never).
        save_every_iterations: also save every N iterations (0: never).
        keep_last: how many checkpoints to keep (older ones are deleted after a successful save).
        resume: at start, load the newest checkpoint of ``save_dir`` (or ``resume_from``) if present.
        resume_from: an explicit checkpoint file to resume from.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        objects: Mapping[str, Any],
        save_every_epochs: int = 1,
        save_every_iterations: int = 0,
        keep_last: int = 2,
        resume: bool = True,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.objects = {
            k: unwrap_model(v) if isinstance(v, torch.nn.Module) else v for k, v in objects.items()
        }
        self.save_every_epochs = save_every_epochs
        self.save_every_iterations = save_every_iterations
        self.keep_last = max(1, keep_last)
        self.resume = resume
        self.resume_from = Path(resume_from) if resume_from else None
        self._own: dict[int, Path] = {}  # iteration -> checkpoint of this run, which pruning may delete
        self._last_saved: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        if self.save_every_epochs:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_every_epochs), self.save)
        if self.save_every_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_every_iterations), self.save)

    def start(self, engine: Engine) -> Path | None:
        """At ``STARTED``: sweep the leftovers of killed saves, then resume (see :meth:`load_latest`)."""
        if is_main_process():
            sweep_temporary_files(self.save_dir, lambda name: _CHECKPOINT_RE.match(name) is not None)
        return self.load_latest(engine)

    def save(self, engine: Engine) -> Path | None:
        """Write ``checkpoint_<iteration>.pt`` (main process only) and prune older ones of this run."""
        if not is_main_process():
            return None
        iteration = engine.state.iteration
        path = self.save_dir / f"checkpoint_{iteration}.pt"
        if self._last_saved == iteration:  # the epoch and iteration triggers can coincide
            return path
        if path.exists() and self._own.get(iteration) != path:
            logger.warning("overwriting %s, a checkpoint that this run did not write", path)
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["trainer"] = {
            "iteration": iteration,
            "epoch_length": engine.state.epoch_length,
            "max_epochs": engine.state.max_epochs,
        }
        atomic_save(state, path)
        self._last_saved = iteration
        self._own[iteration] = path
        logger.info("saved checkpoint %s", path)
        for old in sorted(self._own)[: -self.keep_last]:
            self._own.pop(old).unlink(missing_ok=True)
        return path

    def load_latest(self, engine: Engine) -> Path | None:
        """Restore every object and the trainer's counters from the newest readable checkpoint, if any.

        Raises:
            FileExistsError: ``resume`` is false and ``save_dir`` holds checkpoints.
            FileNotFoundError: ``resume_from`` does not exist.
            RuntimeError: ``resume_from`` cannot be read, or no checkpoint of ``save_dir`` can.
            KeyError, ValueError: the checkpoint was written by another configuration.
        """
        if not self.resume:
            self._refuse_existing_checkpoints()
            return None
        if self.resume_from is not None:
            path = self.resume_from
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint to resume from does not exist: {path}")
            try:
                state = _read_checkpoint(path)
            except _UnreadableCheckpoint as err:
                raise RuntimeError(f"cannot read checkpoint {err}") from err.__cause__
        else:
            found = self._newest_readable()
            if found is None:
                logger.info("no checkpoint in %s: training from the start", self.save_dir)
                return None
            path, state = found
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise KeyError(f"checkpoint {path} lacks {missing}; it was written by another configuration.")
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        max_epochs = engine.state.max_epochs
        trainer = state["trainer"]
        if trainer["epoch_length"] != engine.state.epoch_length:
            raise ValueError(
                f"checkpoint {path} has {trainer['epoch_length']} iterations per epoch, this run "
                f"{engine.state.epoch_length}; resume with the same data and batch size."
            )
        engine.load_state_dict(
            {
                "iteration": trainer["iteration"],
                "epoch_length": trainer["epoch_length"],
                "max_epochs": max_epochs,
            }
        )
        if path.parent.resolve() == self.save_dir.resolve():
            # the run continues the one of save_dir: its checkpoints up to here are this run's history
            self._own = {
                i: p
                for p in find_checkpoints(self.save_dir)
                if (i := _checkpoint_iteration(p)) is not None and i <= trainer["iteration"]
            }
        logger.info(
            "resumed from %s at iteration %d (epoch %d)", path, engine.state.iteration, engine.state.epoch
        )
        return path

    def _refuse_existing_checkpoints(self) -> None:
        found = find_checkpoints(self.save_dir)
        if not found:
            logger.info("resume is false: training from the start")
            return
        raise FileExistsError(
            f"resume is false, but the checkpoint folder {self.save_dir} already holds {len(found)} "
            f"checkpoint(s) of an earlier run (newest: {found[0].name}). They would mix with this run's, "
            "and a later resume could continue the wrong run. Either continue that run with "
            "`--resume true`, or write this run's checkpoints elsewhere with `--ckpt_dir <another folder>`, "
            f"or delete {self.save_dir}/checkpoint_*.pt to start afresh in this folder."
        )

    def _newest_readable(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint of ``save_dir`` that loads, with its state; newer unreadable ones are
        logged and renamed ``<name>.corrupt`` (main process); raises if there are some but none loads."""
        unreadable: list[tuple[Path, str]] = []
        for path in find_checkpoints(self.save_dir):
            try:
                state = _read_checkpoint(path)
            except FileNotFoundError:  # renamed meanwhile by the main process: it was unreadable there
                continue
            except _UnreadableCheckpoint as err:
                logger.warning("cannot read checkpoint %s; trying the next newest one", err)
                unreadable.append((path, str(err)))
                continue
            for bad, _ in unreadable:
                if is_main_process():
                    corrupt = bad.with_name(bad.name + CORRUPT_SUFFIX)
                    os.replace(bad, corrupt)
                    logger.warning(
                        "checkpoint %s is unreadable: renamed to %s (not tried again; delete it when "
                        "no longer needed); resuming from the older %s",
                        bad,
                        corrupt.name,
                        path.name,
                    )
            return path, state
        if unreadable:
            listing = "\n".join(f"  {reason}" for _, reason in unreadable)
            raise RuntimeError(
                f"none of the {len(unreadable)} checkpoint(s) in {self.save_dir} can be read:\n{listing}\n"
                "Move or delete them to train from the start (or point `ckpt_dir` elsewhere), or resume "
                "from another checkpoint with `resume_from`."
            )
        return None


class PretrainedExporter:
    """At the end of training, export the student for fine-tuning and for the Model Zoo.

    Writes (atomically, main process only) ``model_path``: the flat state dict of the whole student
    (``network_def``), and ``encoder_path``: the pretrained encoder stages under official STU-Net keys,
    which the fine-tuning bundles load. When training starts, it deletes the temporary files that a
    killed export left next to them.

    Args:
        network: the student (an :class:`~anatomask_components.networks.AnatoMaskPretrainModel`).
        model_path: e.g. ``models/model.pt``.
        encoder_path: e.g. ``models/encoder.pt``.
    """

    def __init__(
        self, network: torch.nn.Module, model_path: str | os.PathLike, encoder_path: str | os.PathLike
    ) -> None:
        self.network = network
        self.model_path = Path(model_path)
        self.encoder_path = Path(encoder_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.sweep)
        engine.add_event_handler(Events.COMPLETED, self)

    def sweep(self, engine: Engine | None = None) -> None:
        """Delete the temporary files of interrupted exports (main process only)."""
        if not is_main_process():
            return
        for path in {self.model_path, self.encoder_path}:
            sweep_temporary_files(path.parent, lambda name, path=path: name == path.name)

    def __call__(self, engine: Engine | None = None) -> None:
        if not is_main_process():
            return
        net = unwrap_model(self.network)
        atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, self.model_path)
        atomic_save({k: v.cpu() for k, v in net.encoder_state_dict().items()}, self.encoder_path)
        logger.info("exported %s and %s", self.model_path, self.encoder_path)
