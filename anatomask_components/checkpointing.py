"""Atomic checkpoints, exact resume and the pretrained-weights export of a training run."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from anatomask_components.teacher import unwrap_model

__all__ = ["PretrainedExporter", "TrainingCheckpointer", "atomic_save", "latest_checkpoint"]

logger = logging.getLogger(__name__)
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The ``checkpoint_<iteration>.pt`` with the highest iteration in ``folder``, if any."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


class TrainingCheckpointer:
    """Saves the whole training state atomically and resumes from the newest checkpoint.

    The checkpoint holds ``state_dict()`` of every object in ``objects`` (student, teacher handler,
    optimiser, scheduler, iteration with its scaler...) and the trainer's counters, in a file
    ``checkpoint_<iteration>.pt`` that loads with ``weights_only=True``. Attach it after every other
    handler: Ignite runs the handlers of an event in attachment order, and a checkpoint must hold the
    state after the iteration's scheduler step and EMA update.

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

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load_latest)
        if self.save_every_epochs:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_every_epochs), self.save)
        if self.save_every_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_every_iterations), self.save)

    def save(self, engine: Engine) -> Path | None:
        """Write ``checkpoint_<iteration>.pt`` (main process only) and prune older ones."""
        if not _is_main_process():
            return None
        path = self.save_dir / f"checkpoint_{engine.state.iteration}.pt"
        if path.exists():  # the epoch and iteration triggers can coincide
            return path
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["trainer"] = {
            "iteration": engine.state.iteration,
            "epoch_length": engine.state.epoch_length,
            "max_epochs": engine.state.max_epochs,
        }
        atomic_save(state, path)
        logger.info("saved checkpoint %s", path)
        found = sorted(
            (int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name))
        )
        for _, old in found[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, engine: Engine) -> Path | None:
        """Restore every object and the trainer's counters from the newest checkpoint, if any."""
        if not self.resume:
            return None
        path = self.resume_from or latest_checkpoint(self.save_dir)
        if path is None:
            logger.info("no checkpoint in %s: training from the start", self.save_dir)
            return None
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint to resume from does not exist: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
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
        logger.info(
            "resumed from %s at iteration %d (epoch %d)", path, engine.state.iteration, engine.state.epoch
        )
        return path


class PretrainedExporter:
    """At the end of training, export the student for fine-tuning and for the Model Zoo.

    Writes (atomically, main process only) ``model_path``: the flat state dict of the whole student
    (``network_def``), and ``encoder_path``: the pretrained encoder stages under official STU-Net keys,
    which the fine-tuning bundles load.

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
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not _is_main_process():
            return
        net = unwrap_model(self.network)
        atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, self.model_path)
        atomic_save({k: v.cpu() for k, v in net.encoder_state_dict().items()}, self.encoder_path)
        logger.info("exported %s and %s", self.model_path, self.encoder_path)
