"""The bundles' metadata.json: Model Zoo fields, honest metrics, version ranges that fit MONAI Label.

- ``eval_metrics`` hold numbers measured by the bundle itself; none is measured on the challenge data
  here, so they are empty (the paper's figures are quoted, as the paper's, in each docs/README.md).
- ``required_packages_version`` holds version ranges: they admit the versions installed here and the
  MONAI Label 0.8.5 environment (numpy<2, pydicom 2.4.4).
- ``monai_version``, ``pytorch_version`` and ``numpy_version`` stay single versions, those the bundle was
  built and tested with: MONAI compares ``monai_version`` with the installed version as a plain string
  (``monai.bundle.scripts._examine_monai_version``), which a range would turn into a warning on every
  download and load.
- No ``optional_packages_version``: MONAI 1.6 reads it as the deprecated name of
  ``required_packages_version`` and replaces the latter with it when the metadata is parsed. Optional
  extras (spconv for ``backend=spconv``) are listed in the bundle's docs/README.md instead.
"""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from finetune_common import check_metadata
from monai.bundle import ConfigParser
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from anatomask_components.bundle_builder import discover_bundles

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
NAMES = list(discover_bundles())
# MONAI Label 0.8.5 installs next to these (BUNDLES.md, trap 4): monai>=1.4, numpy<2, pydicom 2.4.4
MONAI_LABEL_ENVIRONMENT = {"monai": "1.4.0", "numpy": "1.26.4", "pydicom": "2.4.4"}
REQUIRED = {"anatomask-components", "monai", "torch", "numpy", "pytorch-ignite", "nibabel", "tensorboard"}


def _metadata(bundle: str) -> dict[str, Any]:
    return json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())


def _numbers_only(node: Any) -> bool:
    if isinstance(node, dict):
        return all(_numbers_only(v) for v in node.values())
    return isinstance(node, int | float) and not isinstance(node, bool)


@pytest.mark.parametrize("bundle", NAMES)
def test_model_zoo_fields(bundle):
    metadata = check_metadata(bundle)
    assert metadata["version"] in metadata["changelog"]


@pytest.mark.parametrize("bundle", NAMES)
def test_eval_metrics_are_numbers_measured_here(bundle):
    metrics = _metadata(bundle)["eval_metrics"]
    assert isinstance(metrics, dict) and _numbers_only(metrics)
    assert metrics == {}  # nothing was measured on the real challenge data by this bundle
    readme = (BUNDLES / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "paper" in readme.lower()  # the paper's figures are quoted there, as the paper's


@pytest.mark.parametrize("bundle", NAMES)
def test_required_packages_are_ranges_that_fit_monai_label(bundle):
    required = _metadata(bundle)["required_packages_version"]
    assert REQUIRED <= set(required)
    for name, spec in required.items():
        specifiers = SpecifierSet(spec)  # raises on anything that is not a PEP 440 specifier set
        assert len(specifiers) >= 1 and all(s.operator != "==" for s in specifiers), (name, spec)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert specifiers.contains(Version(installed).base_version), (name, spec, installed)
        if name in MONAI_LABEL_ENVIRONMENT:
            assert specifiers.contains(MONAI_LABEL_ENVIRONMENT[name]), (name, spec)
    for name, version in MONAI_LABEL_ENVIRONMENT.items():
        assert SpecifierSet(required[name]).contains(version), (name, version)


@pytest.mark.parametrize("bundle", NAMES)
def test_build_versions_are_single_versions_inside_the_ranges(bundle):
    metadata = _metadata(bundle)
    required = metadata["required_packages_version"]
    for key, package in [
        ("monai_version", "monai"),
        ("pytorch_version", "torch"),
        ("numpy_version", "numpy"),
    ]:
        version = Version(metadata[key])  # a single version: MONAI compares monai_version as a string
        assert SpecifierSet(required[package]).contains(version), (key, version)


@pytest.mark.parametrize("bundle", NAMES)
def test_no_optional_packages_key_and_spconv_documented(bundle):
    metadata = _metadata(bundle)
    assert "optional_packages_version" not in metadata
    readme = (BUNDLES / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    if bundle == "anatomask_pretrain":  # backend=spconv
        assert "spconv-cu120" in readme


def test_optional_packages_version_would_replace_the_required_packages():
    """Why the metadata has no optional_packages_version: MONAI maps it onto required_packages_version."""
    parser = ConfigParser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser.read_meta(
            {"required_packages_version": {"a": ">=1"}, "optional_packages_version": {"b": ">=2"}}
        )
    assert parser["_meta_"]["required_packages_version"] == {"b": ">=2"}


@pytest.mark.parametrize("bundle", NAMES)
def test_metadata_parses_with_every_required_package(bundle):
    parser = ConfigParser()
    parser.read_meta(str(BUNDLES / bundle / "configs" / "metadata.json"))
    assert parser["_meta_"]["required_packages_version"] == _metadata(bundle)["required_packages_version"]
