"""Fine-tuning bundles built from one template and a dataset folder; the repository's bundles, discovered.

Every fine-tuning bundle is the template ``bundle_template/finetune/`` of this package (configs, logging
configuration, licence, README; shipped as package data) filled in from a dataset folder of four files:

- ``spec.json``: what the configs of one dataset differ in (:class:`DatasetSpec`): the labels, written once
  as ``{"id": "name"}``, default data folders, accepted modalities, input channels and their modalities,
  normalisation, channel files, lesion volumes in the evaluation;
- ``metadata.json``: the dataset's own fields of ``configs/metadata.json`` (version, changelog, name, task,
  description, data_source, its references, the input's ``format`` and ``channel_def``);
- ``README_data.md``: the dataset's text of ``docs/README.md``: a title and introduction, then sections
  whose headings name the section of the template's README they go into;
- ``data_license.txt``: the terms of the data, written as ``docs/data_license.txt``.

In the template a JSON value ``"{{key}}"``, and ``{{key}}`` in a text file, take the value ``key`` of the
spec or one derived from it (:func:`template_values`); ``{{dataset}}`` marks where the dataset's own
metadata value or README text goes. The output holds no dates, so the same inputs give the same bytes: the
repository keeps each fine-tuning bundle's dataset folder as ``dataset/`` beside what was built from it,
and a test fails when the two disagree (``anatomask build-bundles --check``).

The repository's bundles are the folders of ``bundles/`` holding ``configs/metadata.json``
(:func:`discover_bundles`); those with a ``dataset/spec.json`` are built from the template
(:func:`finetune_bundles`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from anatomask_components.data.datalists import read_json
from anatomask_components.data.normalization import normalise_modality, resolve_schemes

__all__ = [
    "DATASET_FILES",
    "DATASET_FOLDER",
    "REPOSITORY_BUNDLES",
    "TEMPLATE_DIR",
    "DatasetSpec",
    "build_bundle",
    "build_repository_bundles",
    "bundle_differences",
    "bundle_folder",
    "discover_bundles",
    "finetune_bundles",
    "render_bundle",
    "template_values",
]

TEMPLATE_DIR = Path(__file__).resolve().parent / "bundle_template" / "finetune"
REPOSITORY_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
# a fine-tuning bundle's sources, inside its folder; the builder writes everything else it owns
DATASET_FOLDER = "dataset"
DATASET_FILES = ("spec.json", "metadata.json", "README_data.md", "data_license.txt")
# the folders the builder writes in full: a file there that it does not write is stale
WRITTEN_FOLDERS = ("configs", "docs")
DATASET_MARKER = "{{dataset}}"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_WHOLE_PLACEHOLDER = re.compile(r"^\{\{(\w+)\}\}$")
_FENCE = "```"
_SCHEME_PROSE = {
    "ct": (
        "with nnU-Net's CT scheme (clipped to the dataset fingerprint's foreground percentiles 0.5 and 99.5, "
        "then z-scored with its foreground mean and std)"
    ),
    "zscore": "z-scored per image",
    "suv": "clipped to SUV 0-{suv_max:g} and divided by {suv_max:g}",
    "none": "as they are",
}


@dataclass(frozen=True)
class DatasetSpec:
    """What the configs of one fine-tuning dataset differ in: ``dataset/spec.json``.

    Args:
        labels: ``{"0": "background", "1": name, ...}``, ids 0..N-1 in order: ``labels`` of train.json and
            inference.json, ``channel_def`` of the output and the label prose of metadata.json, the README's
            table.
        dataset_dir: default training data (dataset folder or datalist JSON) of train.json.
        inference_dataset_dir: default ``dataset_dir`` of inference.json (spec.json may leave it out: then
            ``dataset_dir``).
        readme_dataset_dir: the dataset folder the README's commands name (may be left out: ``dataset_dir``).
        accepted_modalities: the modalities the bundle accepts (``CT``, ``MR``, ``PET``).
        normalization: one scheme, or one per modality
            (:func:`~anatomask_components.data.normalization.resolve_schemes`).
        in_channels: input channels of the network.
        channel_modalities: the modality of each input channel (multi-modal input); null: each case's own.
        image_channel_dim: ``-1`` to read files holding every channel in their last axis as well.
        channel_files: file names of the channels inside a case folder, for inference on folders.
        inference_modality: the modality of scans found in a folder at inference (null: none stored).
        lesion_volumes: the evaluation adds false-positive and false-negative volumes (lesion tasks).
    """

    labels: dict[str, str]
    dataset_dir: str
    inference_dataset_dir: str
    readme_dataset_dir: str
    accepted_modalities: list[str]
    normalization: str | dict[str, str] = "ct"
    in_channels: int = 1
    channel_modalities: list[str] | None = None
    image_channel_dim: int | None = None
    channel_files: list[str] | None = None
    inference_modality: str | None = None
    lesion_volumes: bool = False

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], source: str = "spec.json") -> DatasetSpec:
        """A checked spec from the content of ``spec.json``.

        Raises:
            ValueError: an unknown or missing key, or a value that the bundles cannot use.
        """
        if not isinstance(spec, Mapping):
            raise ValueError(f"{source}: must hold a JSON object, got {type(spec).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(known)}"
            )
        missing = [key for key in ("labels", "dataset_dir", "accepted_modalities") if key not in spec]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        values = {
            "inference_dataset_dir": spec["dataset_dir"],
            "readme_dataset_dir": spec["dataset_dir"],
            **copy.deepcopy(dict(spec)),
        }
        result = cls(**values)
        result._check(source)
        return result

    def _check(self, source: str) -> None:
        def fail(message: str) -> NoReturn:
            raise ValueError(f"{source}: {message}")

        ids = list(self.labels) if isinstance(self.labels, dict) else []
        if len(ids) < 2 or ids != [str(i) for i in range(len(ids))]:
            fail(f'labels must map the ids "0", "1", ... in order to names, got {self.labels!r}')
        names = list(self.labels.values())
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            fail(f"label names must be distinct, non-empty strings, got {names}")
        if not isinstance(self.accepted_modalities, list) or not self.accepted_modalities:
            fail("accepted_modalities must be a non-empty list")
        if not isinstance(self.normalization, str | dict):
            fail(
                f"normalization must be a scheme or an object of one per modality, got {self.normalization!r}"
            )
        for modality in self.accepted_modalities:
            try:
                canonical = normalise_modality(modality)
            except ValueError as error:
                fail(str(error))
            if canonical != modality:
                fail(f"write the modality {modality!r} as {canonical!r}")
        try:
            resolve_schemes(self.normalization)
        except ValueError as error:
            fail(str(error))
        if type(self.in_channels) is not int or self.in_channels < 1:
            fail(f"in_channels must be a positive integer, got {self.in_channels!r}")
        for key in ("channel_modalities", "channel_files"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, list) or len(value) != self.in_channels):
                fail(
                    f"{key} must be null or a list of in_channels ({self.in_channels}) entries, got {value!r}"
                )
        used = [
            *(self.channel_modalities or []),
            *([self.inference_modality] if self.inference_modality else []),
        ]
        if not set(used) <= set(self.accepted_modalities):
            fail(f"modalities {used} must be among accepted_modalities {self.accepted_modalities}")
        if self.image_channel_dim is not None and type(self.image_channel_dim) is not int:
            fail(f"image_channel_dim must be null or an integer, got {self.image_channel_dim!r}")
        if not isinstance(self.lesion_volumes, bool):
            fail(f"lesion_volumes must be true or false, got {self.lesion_volumes!r}")


def _json_text(value: Any) -> str:
    """The bundles' JSON formatting."""
    return json.dumps(value, indent=4) + "\n"


def template_values(spec: DatasetSpec, bundle_name: str) -> dict[str, Any]:
    """The values the template's ``{{key}}`` placeholders take.

    Args:
        spec: the dataset's spec.
        bundle_name: the bundle's folder name.

    Returns:
        every field of ``spec``, and ``bundle_name``, ``num_classes``, ``first_class`` (label 1's name),
        ``modality``, ``image_classes``, ``label_classes``, ``pred_classes`` (metadata.json prose) and
        ``label_table`` (the README's table).
    """
    train = read_json(TEMPLATE_DIR / "configs" / "train.json")
    labels = spec.labels
    num_classes = len(labels)
    foreground = "class" if num_classes == 2 else "classes"
    rows = "\n".join(f"| {label_id} | {name} |" for label_id, name in labels.items())
    return {
        **dataclasses.asdict(spec),
        "bundle_name": bundle_name,
        "num_classes": num_classes,
        "first_class": labels["1"],
        "modality": (
            " and ".join(spec.channel_modalities)
            if spec.channel_modalities
            else " or ".join(spec.accepted_modalities)
        ),
        "image_classes": _image_classes(spec, train["spacing"], train["suv_max"]),
        "label_classes": ", ".join(f"{label_id} {name}" for label_id, name in labels.items()),
        "pred_classes": (
            f"{num_classes} channels, one per label ({labels['0']} and {num_classes - 1} {foreground}); "
            f"the written label map holds ids 0..{num_classes - 1}"
        ),
        "label_table": f"| id | class |\n|---|---|\n{rows}",
    }


def _image_classes(spec: DatasetSpec, spacing: list[float], suv_max: float) -> str:
    """The input's channels, geometry and normalisation in words (``image_classes`` of metadata.json)."""
    accepted = spec.accepted_modalities
    if spec.channel_modalities:
        channels = f"{spec.in_channels} channels ({', '.join(spec.channel_modalities)})"
    elif spec.in_channels > 1:
        channels = f"{spec.in_channels} channels of {' or '.join(accepted)}"
    else:
        channels = f"single channel {' or '.join(accepted)}"
    if not spec.channel_modalities and len(accepted) > 1:
        channels += " (the modality of each case from the datalist)"
    size = f"{spacing[0]:g}" if len(set(spacing)) == 1 else " x ".join(f"{s:g}" for s in spacing)
    schemes = resolve_schemes(spec.normalization)
    intensities = ", ".join(
        f"{modality} {_SCHEME_PROSE[schemes[modality]].format(suv_max=suv_max)}"
        for modality in dict.fromkeys(spec.channel_modalities or accepted)
    )
    return f"{channels}, reoriented to RAS and resampled to {size} mm; intensities: {intensities}"


def _fill_json(value: Any, values: Mapping[str, Any], where: str, path: str = "") -> Any:
    """``value`` with every ``"{{key}}"`` replaced by ``values[key]``."""
    if isinstance(value, dict):
        return {k: _fill_json(v, values, where, f"{path}#{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_json(v, values, where, f"{path}#{i}") for i, v in enumerate(value)]
    if isinstance(value, str) and "{{" in value:
        match = _WHOLE_PLACEHOLDER.match(value)
        if value == DATASET_MARKER:
            raise ValueError(
                f"{where}: {path} comes from the dataset's metadata.json, which does not give it"
            )
        if match is None or match.group(1) not in values:
            raise ValueError(f"{where}: {path} is {value!r}, not one of the placeholders {sorted(values)}")
        return copy.deepcopy(values[match.group(1)])
    return value


def _fill_text(text: str, values: Mapping[str, Any], where: str) -> str:
    """``text`` with every ``{{key}}`` replaced by ``values[key]`` (strings as they are, the rest as JSON)."""

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise ValueError(
                f"{where}: unknown placeholder {match.group(0)}; the placeholders are {sorted(values)}"
            )
        found = values[key]
        return found if isinstance(found, str) else json.dumps(found)

    return _PLACEHOLDER.sub(value, text)


def _merge_metadata(template: Any, own: Any, where: str, path: str = "") -> Any:
    """The template's metadata with the dataset's merged in: objects key by key (template order first),
    lists extended, anything else replaced; fields written from the spec cannot be given."""
    if isinstance(template, dict) and isinstance(own, dict):
        merged = {
            key: _merge_metadata(value, own[key], where, f"{path}#{key}" if path else key)
            if key in own
            else value
            for key, value in template.items()
        }
        merged.update({key: value for key, value in own.items() if key not in template})
        return merged
    if isinstance(template, list) and isinstance(own, list):
        return template + own
    if isinstance(template, str) and template != DATASET_MARKER and _WHOLE_PLACEHOLDER.match(template):
        raise ValueError(f"{where}: {path} is written from spec.json ({template}); leave it out")
    return own


def _split_markdown(text: str) -> list[tuple[str | None, list[str]]]:
    """``[(heading, lines)]`` per ``## `` section (code blocks are not searched); heading None before the
    first."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    in_code = False
    for line in text.splitlines():
        if line.startswith(_FENCE):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            sections.append((line[3:].strip(), [line]))
        else:
            sections[-1][1].append(line)
    return sections


def _merge_readme(template: str, dataset_text: str, where: str) -> str:
    """The template's README with each ``{{dataset}}`` line replaced by the dataset's text of that section
    (the part before the first heading for the marker before the template's first heading), or removed."""
    parts = {}
    for heading, lines in _split_markdown(dataset_text):
        if heading in parts:
            raise ValueError(f"{where}: the section '## {heading}' is given twice")
        parts[heading] = "\n".join(lines[1:] if heading else lines).strip()
    if not parts[None]:
        raise ValueError(f"{where}: begins with no title and introduction (the text before the first '## ')")
    sections = _split_markdown(template)
    takes_text = [heading for heading, lines in sections if DATASET_MARKER in lines]
    unplaced = [heading for heading in parts if heading not in takes_text]
    if unplaced:
        raise ValueError(
            f"{where}: no place in the template for {', '.join(f'## {h}' for h in unplaced)}; the sections "
            f"that take dataset text are {', '.join(f'## {h}' for h in takes_text if h)}"
        )
    out: list[str] = []
    for heading, lines in sections:
        for line in lines:
            if line != DATASET_MARKER:
                out.append(line)
            elif parts.get(heading):
                out.extend(parts[heading].split("\n"))
            elif out and out[-1] == "":
                out.pop()  # the marker's blank line goes with it
    return "\n".join(out) + "\n"


def render_bundle(dataset_dir: str | os.PathLike, bundle_name: str) -> dict[str, bytes]:
    """The files of a fine-tuning bundle built from the template and a dataset folder.

    Args:
        dataset_dir: folder with ``spec.json``, ``metadata.json``, ``README_data.md``, ``data_license.txt``.
        bundle_name: the bundle's folder name (in the README's commands and ``large_files.yml``).

    Returns:
        path inside the bundle -> content.

    Raises:
        FileNotFoundError: a file of the dataset folder is missing.
        ValueError: a spec the bundles cannot use, metadata that gives a field written from the spec, a
            README section without a place in the template.
    """
    dataset_dir = Path(dataset_dir)
    missing = [name for name in DATASET_FILES if not (dataset_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset_dir}: missing {', '.join(missing)} (a dataset folder has {', '.join(DATASET_FILES)})"
        )
    spec = DatasetSpec.from_dict(read_json(dataset_dir / "spec.json"), str(dataset_dir / "spec.json"))
    values = template_values(spec, bundle_name)
    files = {"docs/data_license.txt": (dataset_dir / "data_license.txt").read_bytes()}
    for path in sorted(p for p in TEMPLATE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        relative = path.relative_to(TEMPLATE_DIR).as_posix()
        text = path.read_text(encoding="utf-8")
        where = f"template {relative}"
        if relative == "configs/metadata.json":
            own = dataset_dir / "metadata.json"
            merged = _merge_metadata(json.loads(text), read_json(own), str(own))
            content = _json_text(_fill_json(merged, values, f"{where} + {own}"))
        elif path.suffix == ".json":
            content = _json_text(_fill_json(json.loads(text), values, where))
        elif relative == "docs/README.md":
            readme = dataset_dir / "README_data.md"
            merged = _merge_readme(text, readme.read_text(encoding="utf-8"), str(readme))
            content = _fill_text(merged, values, f"{where} + {readme}")
        else:
            content = _fill_text(text, values, where)
        files[relative] = content.encode("utf-8")
    return dict(sorted(files.items()))


def build_bundle(dataset_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write a fine-tuning bundle (:func:`render_bundle`) into ``out``.

    Args:
        dataset_dir: the dataset folder.
        out: the bundle folder (default: the folder holding ``dataset_dir``); its name is the bundle's name.
            Files the builder does not write (``dataset/``, ``models/``, ``runs/``) are left as they are.

    Returns:
        the bundle folder.
    """
    out = Path(out) if out is not None else Path(dataset_dir).resolve().parent
    for relative, content in render_bundle(dataset_dir, out.resolve().name).items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
    return out


def bundle_differences(
    bundle_dir: str | os.PathLike, dataset_dir: str | os.PathLike | None = None
) -> list[str]:
    """The files of a bundle folder that differ from what :func:`build_bundle` writes there.

    Args:
        bundle_dir: the bundle folder.
        dataset_dir: its dataset folder (default: ``<bundle_dir>/dataset``).

    Returns:
        ``"<path>: <why>"`` per differing, missing or stale file (a file in ``configs/`` or ``docs/`` that the
        builder does not write), sorted; empty when the folder is what the builder writes.
    """
    bundle_dir = Path(bundle_dir)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else bundle_dir / DATASET_FOLDER
    expected = render_bundle(dataset_dir, bundle_dir.resolve().name)
    differences = []
    for relative, content in expected.items():
        path = bundle_dir / relative
        if not path.is_file():
            differences.append(f"{relative}: missing")
        elif path.read_bytes() != content:
            differences.append(f"{relative}: differs from what the builder writes")
    for folder in WRITTEN_FOLDERS:
        for path in sorted((bundle_dir / folder).rglob("*")):
            relative = path.relative_to(bundle_dir).as_posix()
            if path.is_file() and relative not in expected and "__pycache__" not in path.parts:
                differences.append(f"{relative}: not written by the builder (stale)")
    return sorted(differences)


def build_repository_bundles(
    check: bool = False, root: str | os.PathLike = REPOSITORY_BUNDLES
) -> dict[str, list[str]]:
    """Rebuild every fine-tuning bundle of a bundles folder from its ``dataset/`` folder.

    Args:
        check: only compare, write nothing.
        root: the bundles folder (default: the repository's ``bundles/``).

    Returns:
        bundle name -> its files that differed before (:func:`bundle_differences`).
    """
    differences = {}
    for name, folder in finetune_bundles(root).items():
        differences[name] = bundle_differences(folder)
        if not check and differences[name]:
            build_bundle(folder / DATASET_FOLDER, folder)
    return differences


def discover_bundles(root: str | os.PathLike = REPOSITORY_BUNDLES) -> dict[str, Path]:
    """The bundles of a folder: its subfolders holding ``configs/metadata.json``, by name.

    Args:
        root: the bundles folder (default: the repository's ``bundles/``; none when the package is not
            installed from a checkout).

    Returns:
        bundle name -> folder, sorted by name.
    """
    root = Path(root)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "configs" / "metadata.json").is_file()}


def finetune_bundles(root: str | os.PathLike = REPOSITORY_BUNDLES) -> dict[str, Path]:
    """The bundles of a folder built from the fine-tuning template (with ``dataset/spec.json``), by name."""
    return {n: p for n, p in discover_bundles(root).items() if (p / DATASET_FOLDER / "spec.json").is_file()}


def bundle_folder(bundle: str | os.PathLike, root: str | os.PathLike = REPOSITORY_BUNDLES) -> Path:
    """A bundle folder from its path or from the name of one of the bundles of ``root``.

    Raises:
        ValueError: neither a bundle folder (with ``configs/metadata.json``) nor a discovered name.
    """
    path = Path(bundle)
    if (path / "configs" / "metadata.json").is_file():
        return path
    bundles = discover_bundles(root)
    if str(bundle) in bundles:
        return bundles[str(bundle)]
    raise ValueError(
        f"unknown bundle {str(bundle)!r}; give a bundle folder (with configs/metadata.json) or one of "
        f"{', '.join(bundles) or f'the bundles of {root} (none found)'}"
    )
