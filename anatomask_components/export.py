"""Model Zoo archives of the repository's bundles (``anatomask export-bundle``).

The bundles in ``bundles/`` import the installed ``anatomask_components`` package. An archive must run where
the package is not installed, so the package's code travels inside it following the Zoo's ``scripts/``
convention: ``scripts/anatomask_components/...`` is the package's source with every absolute reference to the
package in code rewritten mechanically to ``scripts.anatomask_components``.

The configs cannot simply ``"$import scripts"``: MONAI evaluates every import statement of a config before
anything else, and monai 1.6 puts the bundle folder on ``sys.path`` only when the workflow runs, after
``initialize``; an archive started from another working directory (``--bundle_root`` pointing at it) would
fail with "No module named 'scripts'". So the package's imports leave the configs' ``imports``, and a config
item ``scripts`` loads the package instead: it puts ``@bundle_root`` first on ``sys.path`` and imports the
modules those lines imported. ``$`` expressions reach the package through it
(``@scripts.anatomask_components.engines...``), ``_target_`` paths name ``scripts.anatomask_components...``,
and a config that defines the item resolves it first thing in its ``initialize``, so that components built
there find ``scripts`` too. The archive runs from any working directory with ``--bundle_root`` set to its
folder (or from the folder itself, where the default ``"."`` is right), and under MONAI Label, which puts the
bundle folder on ``sys.path`` and unloads ``scripts`` between bundles. Because the whole package lives under
``scripts``, each bundle gets its own copy and nothing leaks between bundles.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import tokenize
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import anatomask_components
from anatomask_components.bundle_builder import bundle_folder
from anatomask_components.weights import load_checkpoint

__all__ = [
    "config_package_imports",
    "export_bundle",
    "exported_config",
    "exported_metadata",
    "exported_package",
    "rewrite_imports",
]

PACKAGE = "anatomask_components"
DISTRIBUTION = "anatomask-components"
SCRIPTS = "scripts"
# The command line, the exporters, the bundle builder, the demo and the MONAI Label app's files drive the
# package from outside.
EXCLUDED = ("cli.py", "export.py", "bundle_builder.py", "demo", "monailabel_app.py", "monailabel_app_files")
# What a bundle holds besides models/ (weights come from --weights only, never from a local training run).
BUNDLE_FILES = ("LICENSE", "large_files.yml")
BUNDLE_FOLDERS = ("configs", "docs")
# zip entries get a fixed date so that an archive depends on its content only
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

SCRIPTS_INIT = '''"""Custom code of this bundle: the anatomask_components package, version {version},
exported by `anatomask export-bundle` with its imports rewritten to scripts.anatomask_components.
Do not edit it here: change the package and export the bundle again.

Importing it imports the modules that the bundle's configs use (their attribute chains need them loaded).
"""
'''

_PACKAGE_IN_CONFIG = re.compile(rf"(?<![\w.]){PACKAGE}\b")
# the config item that loads the package in an archive; see the module docstring
SCRIPTS_ITEM = SCRIPTS
_CONFIG_REFERENCE = re.compile(r"@[\w#]+")
_PACKAGE_IMPORT = re.compile(rf"^\$import ({PACKAGE}(?:\.\w+)*)$")
# MONAI parses every "$" string containing the word "import" as Python before references are replaced, and
# "@bundle_root" is no Python: so the loader is a component, and the expression that needs the reference
# (resolved first, through _requires_) does not mention importing.
SCRIPTS_LOADER = {
    "_target_": "importlib.import_module",
    "name": SCRIPTS,
    "_requires_": "$sys.path.insert(0, os.path.abspath(@bundle_root))",
}
LOADER_IMPORTS = ("$import os", "$import sys")


def rewrite_imports(source: str) -> str:
    """``anatomask_components`` -> ``scripts.anatomask_components`` wherever Python code names the package
    (imports and attribute chains such as ``anatomask_components.__version__``); strings, comments and
    docstrings are left as they are."""
    return _prefix_package(source, f"{SCRIPTS}.")


def _prefix_package(source: str, prefix: str, scanned: str | None = None) -> str:
    """Insert ``prefix`` before every name of the package in Python code (not after a dot, not in strings).

    ``scanned``: the text to tokenize in place of ``source``, with the same layout (config expressions).
    """
    lines = io.StringIO(source).readlines()  # split as tokenize numbers the rows
    hits = []
    previous = None
    for token in tokenize.generate_tokens(io.StringIO(scanned or source).readline):
        if token.type in (tokenize.NL, tokenize.COMMENT):
            continue
        after_dot = previous is not None and previous.type == tokenize.OP and previous.string == "."
        if token.type == tokenize.NAME and token.string == PACKAGE and not after_dot:
            hits.append(token.start)
        previous = token
    for row, col in reversed(hits):
        line = lines[row - 1]
        lines[row - 1] = f"{line[:col]}{prefix}{line[col:]}"
    return "".join(lines)


def exported_package(config_modules: Sequence[str] = ()) -> dict[str, str]:
    """The package's modules as the archive holds them.

    Args:
        config_modules: modules of the package that the configs import (see :func:`config_package_imports`);
            the generated ``scripts/__init__.py`` imports them.

    Returns:
        path inside the bundle (``scripts/anatomask_components/...``) -> rewritten source, plus a generated
        ``scripts/__init__.py``.

    Raises:
        RuntimeError: an exported module imports one that is left out (:data:`EXCLUDED`).
    """
    package_dir = Path(anatomask_components.__file__).parent
    init = SCRIPTS_INIT.format(version=anatomask_components.__version__)
    init += "".join(f"import {SCRIPTS}.{module}\n" for module in sorted(set(config_modules)))
    files = {f"{SCRIPTS}/__init__.py": init}
    left_out = re.compile(
        rf"\b{SCRIPTS}\.{PACKAGE}\.({'|'.join(re.escape(Path(e).stem) for e in EXCLUDED)})\b"
    )
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir)
        if relative.parts[0] in EXCLUDED:
            continue
        source = rewrite_imports(path.read_text(encoding="utf-8"))
        if match := left_out.search(source):
            raise RuntimeError(
                f"{PACKAGE}/{relative.as_posix()} imports {match.group(0)}, which is not exported"
            )
        files[f"{SCRIPTS}/{PACKAGE}/{relative.as_posix()}"] = source
    return files


def _rewrite_config(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: _PACKAGE_IN_CONFIG.sub(f"{SCRIPTS}.{PACKAGE}", item)
            if key == "_target_" and isinstance(item, str)
            else _rewrite_config(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_config(item) for item in value]
    if isinstance(value, str) and value.startswith("$") and _PACKAGE_IN_CONFIG.search(value):
        # a reference's "#" would start a comment for tokenize: scan a copy where it is "_"
        expression = value[1:]
        scanned = _CONFIG_REFERENCE.sub(lambda ref: ref.group(0).replace("#", "_"), expression)
        return "$" + _prefix_package(expression, f"@{SCRIPTS_ITEM}.", scanned)
    return value


def config_package_imports(config: Mapping[str, Any]) -> list[str]:
    """The package's modules that a config's ``imports`` import, e.g. ``["anatomask_components.engines"]``.

    Raises:
        ValueError: a package import other than ``import anatomask_components[.module]`` (an alias or a
            ``from`` import binds a name that expressions cannot reach through the ``scripts`` item).
    """
    modules = []
    for line in config.get("imports") or []:
        if isinstance(line, str) and _PACKAGE_IN_CONFIG.search(line):
            match = _PACKAGE_IMPORT.match(line)
            if match is None:
                raise ValueError(
                    f"cannot export the config import {line!r}: write it as '$import {PACKAGE}[.module]'"
                )
            modules.append(match.group(1))
    return modules


def exported_config(config: dict[str, Any]) -> dict[str, Any]:
    """A bundle config whose package references go through ``scripts`` (see the module docstring).

    ``_target_`` paths become ``scripts.anatomask_components...`` and ``$`` expressions
    ``@scripts.anatomask_components...``. A config whose ``imports`` name the package loses those lines and
    gains the item ``scripts`` (:data:`SCRIPTS_LOADER`, which imports the package from ``@bundle_root``) and,
    if it has an ``initialize`` list, ``"$@scripts"`` at its head. Configs without ``imports``
    (``evaluate.json``, overrides) are merged on top of one that defines the item.

    Raises:
        ValueError: an import that cannot be exported (:func:`config_package_imports`), or a config that
            has an item ``scripts`` of its own.
    """
    exported = {key: _rewrite_config(value) for key, value in config.items() if key != "imports"}
    if not config_package_imports(config):
        return {"imports": config["imports"], **exported} if "imports" in config else exported
    if SCRIPTS_ITEM in config:
        raise ValueError(f"the config already has an item {SCRIPTS_ITEM!r}, which the archive needs")
    imports = [line for line in config["imports"] if not _PACKAGE_IN_CONFIG.search(str(line))]
    result: dict[str, Any] = {
        "imports": imports + [line for line in LOADER_IMPORTS if line not in imports],
        SCRIPTS_ITEM: copy.deepcopy(SCRIPTS_LOADER),
        **exported,
    }
    if isinstance(result.get("initialize"), list):
        result["initialize"] = [f"$@{SCRIPTS_ITEM}", *result["initialize"]]
    return result


def exported_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """metadata.json of the archive: without the requirement of the package, whose code it carries."""
    metadata = copy.deepcopy(metadata)
    metadata.get("required_packages_version", {}).pop(DISTRIBUTION, None)
    return metadata


def _bundle_entries(bundle_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """The bundle's own files, configs rewritten, and the package's modules that the configs import."""
    entries = {}
    modules: list[str] = []
    paths = [bundle_dir / name for name in BUNDLE_FILES if (bundle_dir / name).is_file()]
    for folder in BUNDLE_FOLDERS:
        paths += [p for p in sorted((bundle_dir / folder).rglob("*")) if p.is_file()]
    for path in paths:
        relative = path.relative_to(bundle_dir)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        content = path.read_bytes()
        if relative.parts[0] == "configs" and path.suffix == ".json":
            config = json.loads(content)
            if path.name == "metadata.json":
                exported = exported_metadata(config)
            else:
                modules += config_package_imports(config)
                exported = exported_config(config)
            content = (json.dumps(exported, indent=4) + "\n").encode()
        entries[relative.as_posix()] = content
    return entries, modules


def _fingerprint_entries(name: str, weights: Path, entries: Mapping[str, bytes]) -> dict[str, bytes]:
    """``models/fingerprint.json`` and ``configs/inference.json`` holding the weights' fingerprint."""
    from anatomask_components.data.fingerprint import FINGERPRINT_FILE, model_fingerprint, needs_fingerprint

    inference = json.loads(entries["configs/inference.json"])
    if not needs_fingerprint(inference.get("normalization", "zscore")):
        return {}
    fingerprint = model_fingerprint(inference.get("fingerprint"), weights)
    if fingerprint is None:
        raise ValueError(
            f"{weights}: {name} normalises CT with the training data's fingerprint, and there is no "
            f"{FINGERPRINT_FILE} beside the weights (training writes it next to models/model.pt); copy it "
            "there, or pass it in configs/inference.json"
        )
    inference["fingerprint"] = fingerprint
    return {
        "configs/inference.json": (json.dumps(inference, indent=4) + "\n").encode(),
        f"models/{FINGERPRINT_FILE}": (json.dumps(fingerprint, indent=4) + "\n").encode(),
    }


def _zip_info(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.external_attr = 0o644 << 16
    info.compress_type = compress_type
    return info


def export_bundle(
    bundle: str | Path,
    out: str | Path,
    weights: str | Path | None = None,
) -> Path:
    """Write a Model Zoo archive of a bundle that runs without this package installed.

    The zip holds one folder named after the bundle: ``configs/`` (rewritten, see :func:`exported_config`
    and :func:`exported_metadata`), ``docs/``, ``LICENSE``, ``large_files.yml`` as in the repository,
    ``scripts/`` (:func:`exported_package`) and, with ``weights``, ``models/model.pt`` and the intensity
    fingerprint the model was trained with (``fingerprint.json`` beside the weights, as training writes it),
    both as ``models/fingerprint.json`` and in ``configs/inference.json``, so that the archive and MONAI
    Label normalise CT exactly as training did.

    Args:
        bundle: a bundle folder, or the name of one of the repository's bundles
            (:func:`~anatomask_components.bundle_builder.discover_bundles`); the archive's folder takes the
            bundle folder's name.
        out: the zip file to write.
        weights: a flat state dict of the bundle's ``network_def``, stored as ``models/model.pt``. Without
            it the archive has no weights; ``large_files.yml`` lists published ones.
            A bundle that normalises CT with the dataset fingerprint needs ``fingerprint.json`` beside it.

    Returns:
        the written archive.

    Raises:
        ValueError: neither a bundle folder nor a discovered bundle name (the repository's bundles are
            found only where the package is installed from a checkout, ``pip install -e .``), weights
            that are not a flat state dict, or weights without the fingerprint their bundle's
            normalisation needs.
        FileNotFoundError: the weights file is missing.
    """
    bundle_dir = bundle_folder(bundle).resolve()
    name = bundle_dir.name
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file does not exist: {weights}")
        state = load_checkpoint(weights)
        if not (
            isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())
        ):
            raise ValueError(
                f"{weights}: models/model.pt must be a flat state dict of network_def (the Zoo loads it "
                "into the network directly); save network.state_dict() alone, not a training checkpoint."
            )
    entries, config_modules = _bundle_entries(bundle_dir)
    entries.update((k, v.encode()) for k, v in exported_package(config_modules).items())
    if weights is not None:
        entries.update(_fingerprint_entries(name, Path(weights), entries))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(entries):
            archive.writestr(_zip_info(f"{name}/{path}", zipfile.ZIP_DEFLATED), entries[path])
        if weights is not None:
            # a PyTorch file is a zip of tensors already: deflating it again costs time and saves nothing
            info = _zip_info(f"{name}/models/model.pt", zipfile.ZIP_STORED)
            with open(weights, "rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst)
    return out
