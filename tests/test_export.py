"""``anatomask export-bundle``: Model Zoo archives whose ``scripts/`` carries the package, so that they run
where ``anatomask_components`` is not installed."""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigExpression, ConfigWorkflow

import anatomask_components
from anatomask_components import cli
from anatomask_components.bundle_builder import discover_bundles
from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.phantoms import (
    make_affine,
    make_phantom,
    phantom_fingerprint,
    write_phantom_dataset,
)
from anatomask_components.data.writers import write_volume
from anatomask_components.export import SCRIPTS_LOADER, export_bundle
from anatomask_components.networks import STUNet
from anatomask_components.networks.stunet import stunet_preset

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
BUNDLE_NAMES = list(discover_bundles())
PACKAGE_DIR = Path(anatomask_components.__file__).parent
PACKAGE = "anatomask_components"
TINY = stunet_preset("tiny")  # depths [1] * 5, widths 8-64, strides [2,2,2] x 3 + [1,1,1]
BARE_PACKAGE = re.compile(rf"(?<![\w.]){PACKAGE}\b")
# ``python -m monai.bundle`` where the package cannot be imported: the bundle folder (the working directory)
# comes first on sys.path, as with -m, and any import of the package fails.
WITHOUT_PACKAGE = """
import importlib.abc, runpy, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "anatomask_components":
            raise ImportError(f"{name}: the exported bundle must not need the package")

sys.meta_path.insert(0, Refuse())
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


class RefusePackage(importlib.abc.MetaPathFinder):
    """Fails every import of the package."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == PACKAGE:
            raise ImportError(f"{name}: the exported bundle must not need the package")
        return None


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("archives")
    return {name: export_bundle(name, folder / f"{name}.zip") for name in BUNDLE_NAMES}


def unpack(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    (bundle,) = dest.iterdir()
    return bundle


def package_sources() -> dict[str, str]:
    """The package's modules a bundle needs: all but the command line, the exporters, the bundle builder, the
    demo and the files of the MONAI Label app."""
    left_out = (
        "cli.py",
        "export.py",
        "bundle_builder.py",
        "demo",
        "monailabel_app.py",
        "monailabel_app_files",
    )
    return {
        p.relative_to(PACKAGE_DIR).as_posix(): p.read_text(encoding="utf-8")
        for p in PACKAGE_DIR.rglob("*.py")
        if p.relative_to(PACKAGE_DIR).parts[0] not in left_out
    }


@pytest.fixture
def without_package(monkeypatch):
    """The package cannot be imported in this process, and ``scripts`` is unloaded before and after, as MONAI
    Label does between bundles."""
    for name in [n for n in sys.modules if n.split(".")[0] in (PACKAGE, "scripts")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [RefusePackage(), *sys.meta_path])
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == "scripts"]:
        del sys.modules[name]


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_scripts_are_the_package(name, archives, tmp_path):
    """scripts/anatomask_components is the package's source, only the imports rewritten (no hand edits)."""
    bundle = unpack(archives[name], tmp_path)
    exported = {
        p.relative_to(bundle / "scripts" / PACKAGE).as_posix(): p.read_text(encoding="utf-8")
        for p in (bundle / "scripts" / PACKAGE).rglob("*")
        if p.is_file()
    }
    sources = package_sources()
    assert sorted(exported) == sorted(sources)
    for path, text in exported.items():
        assert text.replace(f"scripts.{PACKAGE}", PACKAGE) == sources[path], path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not [m for m in modules if m and m.split(".")[0] == PACKAGE], (path, modules)
    # importing scripts loads the modules that the configs' imports named
    imported = {
        line.removeprefix("$import ")
        for config in (BUNDLES / name / "configs").glob("*.json")
        for line in json.loads(config.read_text()).get("imports", [])
        if PACKAGE in line
    }
    init = ast.parse((bundle / "scripts" / "__init__.py").read_text())
    assert {alias.name for node in init.body if isinstance(node, ast.Import) for alias in node.names} == {
        f"scripts.{module}" for module in imported
    }


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_bundle_files(name, archives, tmp_path):
    """Configs reach the package through the ``scripts`` item, nothing else changes; metadata drops the
    package but keeps its requirements; the other files are the repository's."""
    bundle = unpack(archives[name], tmp_path)
    assert bundle.name == name
    source = BUNDLES / name
    for path in [source / "LICENSE", source / "large_files.yml", *(source / "docs").iterdir()]:
        assert (bundle / path.relative_to(source)).read_bytes() == path.read_bytes()
    assert not (bundle / "models").exists()
    configs = sorted(p.name for p in (source / "configs").iterdir())
    assert sorted(p.name for p in (bundle / "configs").iterdir()) == configs
    for config in configs:
        original = (source / "configs" / config).read_text(encoding="utf-8")
        text = (bundle / "configs" / config).read_text(encoding="utf-8")
        if config == "metadata.json":
            check_metadata(json.loads(text), json.loads(original))
        elif config.endswith(".json"):
            check_config(json.loads(text), json.loads(original), config)
        else:
            assert text == original, config


def check_config(exported: dict, original: dict, config: str) -> None:
    """No import statement names the package (MONAI runs them before anything else, when the bundle folder
    may not be on sys.path yet); a config that imported it defines the loader item instead and resolves it
    first in ``initialize``; undoing the rewrite gives the repository's config back."""
    assert not [s for s in strings(exported) if BARE_PACKAGE.search(s)], config
    for text in strings(exported):
        if text.startswith("$") and "import" in text:
            # MONAI parses such a string as Python before replacing its "@" references: none may be there
            ast.parse(text[1:])
            assert not ConfigExpression.is_import_statement(text) or "scripts" not in text, (config, text)
    restored = json.loads(
        json.dumps(exported).replace(f"@scripts.{PACKAGE}", PACKAGE).replace(f"scripts.{PACKAGE}", PACKAGE)
    )
    if any(PACKAGE in line for line in original.get("imports", [])):
        assert exported["scripts"] == SCRIPTS_LOADER, config
        assert exported["imports"] == [line for line in original["imports"] if PACKAGE not in line] + [
            line for line in ("$import os", "$import sys") if line not in original["imports"]
        ], config
        del restored["scripts"]
        restored["imports"] = original["imports"]
        if "initialize" in original:
            assert exported["initialize"][0] == "$@scripts", config
            restored["initialize"] = restored["initialize"][1:]
    else:
        assert "scripts" not in exported, config
    assert restored == original, config


def check_metadata(exported: dict, original: dict) -> None:
    pins = exported["required_packages_version"]
    assert "anatomask-components" not in pins
    assert exported | {"required_packages_version": None} == original | {"required_packages_version": None}
    # the scripts need what the package needs, but for the command line (fire)
    needed = {
        re.match(r"[\w.-]+", r).group(0).lower()
        for r in importlib.metadata.requires("anatomask-components")
        if ";" not in r
    }
    assert needed - {"fire", "torch", "monai", "numpy"} <= {name.lower() for name in pins}


def strings(value):
    """Every string of a config."""
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


WORKFLOWS = [("train.json", "train"), ("inference.json", "infer")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """check_properties instantiates the datasets: a labelled datalist, and its images for pretraining."""
    root = tmp_path_factory.mktemp("data")
    write_phantom_dataset(root, n_cases=3, shape=(24, 24, 24), num_classes=2, fractions=(0.34, 0.33, 0.33))
    return {"datalist": root / "datalist.json", "images": root / "images"}


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_properties_without_package(name, archives, data, tmp_path, monkeypatch, without_package):
    """Where only MONAI is installed: the configs' imports, their network and every exported module load from
    scripts/ (the bundle folder on sys.path, as MONAI Label puts it), and the Zoo's properties hold."""
    bundle = unpack(archives[name], tmp_path)
    dataset_dir = data["images"] if name == "anatomask_pretrain" else data["datalist"]
    monkeypatch.syspath_prepend(str(bundle))
    with pytest.raises(ImportError):
        importlib.import_module(PACKAGE)
    for config, kind in WORKFLOWS:
        flow = ConfigWorkflow(
            config_file=str(bundle / "configs" / config),
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"),
            workflow_type=kind,
            bundle_root=str(bundle),
            dataset_dir=str(dataset_dir),
        )
        flow.initialize()
        assert flow.check_properties() == []
        # MONAI's optional_import would hide a failed "$import": import each line's module directly
        for line in flow.parser["imports"]:
            (node,) = ast.parse(line.removeprefix("$")).body
            importlib.import_module(node.names[0].name if isinstance(node, ast.Import) else node.module)
        network = flow.parser.get_parsed_content("network_def")
        assert type(network).__module__.startswith(f"scripts.{PACKAGE}.networks")
    for path in (bundle / "scripts").rglob("*.py"):
        module = ".".join(path.relative_to(bundle).with_suffix("").parts).removesuffix(".__init__")
        assert importlib.import_module(module).__file__ == str(path)


def monai_bundle_run(
    bundle: Path, cwd: Path, config_files: list[str], *args: str
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of an unpacked archive where the package cannot be imported, started in
    ``cwd``: in the bundle folder with relative paths, elsewhere with ``--bundle_root`` (no PYTHONPATH)."""
    if cwd == bundle:
        paths = [f"configs/{name}" for name in config_files]
    else:
        paths = [str(bundle / "configs" / name) for name in config_files]
        args = ("--bundle_root", str(bundle), *args)
    command = [sys.executable, "-c", WITHOUT_PACKAGE, "run", "--config_file", json.dumps(paths), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["bundle folder", "elsewhere"])
def test_inference_without_package(where, tmp_path):
    """The FLARE22 archive with tiny weights segments a scan under ``python -m monai.bundle run`` started in
    the unpacked folder, or in another folder with ``--bundle_root``, where the package cannot be imported."""
    torch.manual_seed(0)
    torch.save(STUNet(1, 14, **TINY).state_dict(), tmp_path / "model.pt")
    write_fingerprint(tmp_path / "model.pt", phantom_fingerprint())
    archive = export_bundle(
        "anatomask_finetune_flare22", tmp_path / "flare22.zip", weights=tmp_path / "model.pt"
    )
    bundle = unpack(archive, tmp_path / "unpacked")
    assert (bundle / "models" / "model.pt").read_bytes() == (tmp_path / "model.pt").read_bytes()
    # the model's CT normalisation travels with it: beside the weights and in inference.json
    carried = json.loads((bundle / "models" / "fingerprint.json").read_text())
    assert carried == phantom_fingerprint()
    assert json.loads((bundle / "configs" / "inference.json").read_text())["fingerprint"] == carried
    affine = make_affine((1.5, 1.5, 2.0), rotation_deg=(0, 0, 10))
    image, _, _ = make_phantom((40, 36, 20), num_classes=14, seed=3, affine=affine)
    write_volume(tmp_path / "scans" / "case.nii.gz", image, affine)
    cwd = bundle if where == "bundle folder" else tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    done = monai_bundle_run(
        bundle,
        cwd,
        ["inference.json", "small_override.json"],
        "--dataset_dir", str(tmp_path / "scans"),
        "--output_dir", str(tmp_path / "predictions"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"scripts.{PACKAGE}.inference" in done.stdout + done.stderr  # the code ran from scripts/
    written = nib.load(tmp_path / "predictions" / "case_seg.nii.gz")
    assert written.shape == (40, 36, 20)
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(written.dataobj))) <= set(range(14))


@pytest.mark.slow
def test_training_from_another_directory(tmp_path):
    """The pretraining archive trains with ``--bundle_root`` from another folder, without the package: its
    run lock (built in ``initialize``, before MONAI puts the bundle on sys.path) comes from scripts/ too, and
    everything is written in the bundle, nothing where it was started."""
    bundle = unpack(export_bundle("anatomask_pretrain", tmp_path / "pretrain.zip"), tmp_path / "unpacked")
    write_phantom_dataset(tmp_path / "scans", n_cases=2, shape=(40, 40, 44), layout="folder", seed=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = monai_bundle_run(
        bundle,
        elsewhere,
        ["train.json", "small_override.json"],
        "--dataset_dir", str(tmp_path / "scans"),
        "--roi_size", "[32, 32, 32]", "--batch_size", "1", "--max_epochs", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"scripts.{PACKAGE}.run_lock - INFO - locked {bundle / 'runs' / '.training.lock'}" in done.stdout
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "encoder.pt").is_file()
    assert (bundle / "runs" / "checkpoints" / "checkpoint_2.pt").is_file()
    assert not list(bundle.rglob(".training.lock"))
    assert not list(elsewhere.iterdir())


def test_a_bundle_folder_exports_like_its_name(tmp_path):
    """``export_bundle`` takes a bundle folder as well as a discovered name: the same archive."""
    by_name = export_bundle("anatomask_finetune_flare22", tmp_path / "by_name.zip")
    by_folder = export_bundle(BUNDLES / "anatomask_finetune_flare22", tmp_path / "by_folder.zip")
    assert by_folder.read_bytes() == by_name.read_bytes()


def test_weights_without_their_fingerprint_are_refused(tmp_path):
    torch.save(STUNet(1, 14, **TINY).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="fingerprint.json"):
        export_bundle("anatomask_finetune_flare22", tmp_path / "out.zip", weights=tmp_path / "model.pt")
    assert not (tmp_path / "out.zip").exists()


def test_weights_must_be_a_flat_state_dict(tmp_path):
    weights = tmp_path / "checkpoint.pt"
    torch.save({"model": STUNet(1, 14, **TINY).state_dict(), "epoch": 3}, weights)
    with pytest.raises(ValueError, match="flat state dict"):
        export_bundle("anatomask_finetune_flare22", tmp_path / "out.zip", weights=weights)
    assert not (tmp_path / "out.zip").exists()


def test_command_line(tmp_path, monkeypatch, capsys):
    """The archive depends on its content only; an unknown bundle is a one-line error."""
    monkeypatch.chdir(tmp_path)
    for attempt in ("a", "b"):
        monkeypatch.setattr(
            sys, "argv", ["anatomask", "export-bundle", "anatomask_pretrain", "--out", f"{attempt}.zip"]
        )
        cli.main()
    out, _ = capsys.readouterr()
    assert out.startswith("[export-bundle] anatomask_pretrain -> a.zip (")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    monkeypatch.setattr(sys, "argv", ["anatomask", "export-bundle", "nope", "--out", "c.zip"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("anatomask export-bundle: error: unknown bundle 'nope'")
