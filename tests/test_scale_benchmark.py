"""The scale benchmark at a small size: compact cache entries, a run that starts on the preprocessed set
without computing anything, and main-process memory flat in the number of scans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_memory_stays_flat_as_scans_are_added(tmp_path):
    out = tmp_path / "scale.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--sizes",
        "5",
        "40",
        "--shape",
        "32",
        "32",
        "32",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [row["scans"] for row in rows] == [5, 40]
    # the small override's 32 x 32 x 48 crop: the 32^3 phantom padded to it, 2 bytes a voxel plus metadata
    voxels = 32 * 32 * 48
    for row in rows:
        assert row["computed"] == row["run_dataset_items"] == row["scans"] and row["bad"] == 0
        assert row["run_computed_nothing"]
        assert 2 * voxels < row["bytes_per_scan"] < 2 * voxels + 12_000
        assert row["preprocess_scans_per_second"] > 0 and row["seconds_to_first_iteration"] > 0
    assert figures["peak_rss_max_over_min"] < 1.15  # 8x the scans, the same memory
    assert "| 40 |" in done.stdout and "peak memory, largest / smallest N" in done.stdout
