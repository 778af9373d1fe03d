"""Fixtures shared by the MONAI Label server tests (test_monailabel_server.py and
test_monailabel_active_learning.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from monailabel_common import example_ct, monailabel_env_python


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    """The MONAI Label environment's interpreter (built on first use, then cached)."""
    return monailabel_env_python()


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict[str, Path]:
    """Example case A: CT and its FLARE22 label."""
    return example_ct(tmp_path_factory.mktemp("examples"))
