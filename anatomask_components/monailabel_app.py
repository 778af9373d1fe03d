"""A MONAI Label app with AnatoMask active learning (``anatomask export-monailabel-app``).

MONAI Label 0.8.5's sample ``monaibundle`` app registers only the ``random`` and ``first`` strategies, so
ranking images by reconstruction difficulty needs an app of its own. The app written here holds:

- ``main.py`` and ``lib/anatomask_active_learning.py`` (from ``monailabel_app_files/``): the scoring method
  ``anatomask_difficulty`` and the strategy ``anatomask_hardest``, next to MONAI Label's ``random`` and
  ``first``;
- ``model/anatomask_pretrain/``: the exported pretraining bundle, whose ``scripts/anatomask_components/
  difficulty.py`` is the scorer the scoring method imports;
- ``model/<name>/``: exported fine-tuning bundles, if given, served for automatic segmentation and training
  the way the ``monaibundle`` app serves them.

Every piece of this package that runs in the server travels inside the bundles' ``scripts/`` folders, so the
server's environment needs MONAI Label only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from anatomask_components.bundle_builder import finetune_bundles
from anatomask_components.export import PACKAGE, SCRIPTS, export_bundle

__all__ = ["APP_FILES", "PRETRAIN", "export_monailabel_app"]

PRETRAIN = "anatomask_pretrain"
APP_FILES = ("main.py", "lib/__init__.py", "lib/anatomask_active_learning.py")
APP_FILES_DIR = Path(__file__).resolve().parent / "monailabel_app_files"
# what the app's code reads in a bundle folder
SCORER = f"{SCRIPTS}/{PACKAGE}/difficulty.py"
REQUIRED = ("configs/inference.json", "configs/metadata.json", "models/model.pt")


def _is_bundle_archive(path: Path) -> bool:
    """A zip holding a bundle folder (a PyTorch weights file is a zip too, without ``configs/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/configs/metadata.json") for n in zf.namelist())


def _unpack_bundle(archive: Path, model_dir: Path, allowed: Sequence[str]) -> str:
    """Unpack an ``anatomask export-bundle`` archive into ``model_dir/<bundle>``; returns the bundle's name.

    Raises:
        ValueError: not a zip, not one folder named after one of ``allowed``, or without the files the app
            reads.
    """
    if not _is_bundle_archive(archive):
        raise ValueError(f"{archive}: not a bundle archive (expected a zip made by anatomask export-bundle)")
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.strip("/")]
        tops = sorted({n.split("/", 1)[0] for n in names})
        if len(tops) != 1 or tops[0] not in allowed:
            found = ", ".join(tops) or "none"
            raise ValueError(f"{archive}: expected one folder named {' or '.join(allowed)}, found {found}")
        top = tops[0]
        needed = list(REQUIRED) + ([SCORER] if top == PRETRAIN else [])
        missing = [f for f in needed if f"{top}/{f}" not in names]
        if missing:
            raise ValueError(
                f"{archive}: {top} lacks {', '.join(missing)} (export it with anatomask export-bundle "
                f"{top} --weights ...)"
            )
        if (model_dir / top).exists():
            raise ValueError(f"{archive}: a second {top} bundle; give each bundle once")
        zf.extractall(model_dir)  # zipfile drops absolute paths and '..' from member names
    return top


def export_monailabel_app(
    out: str | os.PathLike,
    pretrained: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write a MONAI Label app with AnatoMask active learning (see the module docstring).

    Args:
        out: the app folder to write; it must not exist yet (or be empty).
        pretrained: an archive of ``anatomask_pretrain`` made by ``anatomask export-bundle`` (a ``.zip``), or
            pretraining weights (a flat state dict of its ``network_def``, with the ``fingerprint.json`` that
            training writes beside it), exported here with :func:`~anatomask_components.export.export_bundle`.
        finetuned: archives of fine-tuning bundles made by ``anatomask export-bundle``, served for
            segmentation and training.

    Returns:
        the app folder.

    Raises:
        FileExistsError: ``out`` exists and is not an empty folder.
        FileNotFoundError: a given file does not exist.
        ValueError: an archive that is not what the app needs (wrong bundle, missing weights or scorer),
            weights that :func:`~anatomask_components.export.export_bundle` refuses.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; choose a new app folder")
    for path in (pretrained, *finetuned):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final place and renamed at the end: a failed export leaves no half-written app
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_dir = staging / "model"
        model_dir.mkdir()
        archive = Path(pretrained)
        if not _is_bundle_archive(archive):
            archive = export_bundle(PRETRAIN, staging / f"{PRETRAIN}.zip", weights=archive)
        _unpack_bundle(archive, model_dir, [PRETRAIN])
        if archive.parent == staging:
            archive.unlink()
        finetuning = list(finetune_bundles())
        for path in finetuned:
            _unpack_bundle(Path(path), model_dir, finetuning)
        for name in APP_FILES:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(APP_FILES_DIR / name, staging / name)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
