"""Long inference shows progress: case start, sliding-window progress, and the seconds of every case."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from finetune_common import TINY, infer
from monai.inferers import SimpleInferer, SlidingWindowInferer

from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.phantoms import make_affine, make_phantom, phantom_fingerprint
from anatomask_components.data.writers import write_volume
from anatomask_components.inference import sliding_window_count
from anatomask_components.networks import STUNet

BUNDLE = "anatomask_finetune_flare22"
NUM_CLASSES = 14


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [
        ((27, 33, 33), (32, 32, 32), 0.5),
        ((70, 41, 32), (32, 24, 32), 0.25),
        ((20, 20, 20), (32, 32, 32), 0.5),
    ],
)
def test_window_count_matches_monai(shape, roi, overlap):
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return x

    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=3, overlap=overlap, mode="gaussian")
    inferer(torch.zeros(1, 1, *shape), network)
    assert sliding_window_count(inferer, shape) == sum(calls)
    assert sliding_window_count(SimpleInferer(), shape) is None


def _run(tmp_path: Path, progress: bool) -> tuple[list[str], dict, Path]:
    scans = tmp_path / "scans"
    affine = make_affine((0.9, 1.3, 2.5), flip=(True, False, True), rotation_deg=(8, -4, 15))
    image, _, _ = make_phantom((44, 38, 20), num_classes=NUM_CLASSES, seed=7, affine=affine)
    write_volume(scans / "oblique.nii.gz", image, affine)
    (scans / "truncated.nii.gz").write_bytes(b"\x1f\x8b broken")
    model = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(STUNet(1, NUM_CLASSES, **TINY).state_dict(), model)
    write_fingerprint(model, phantom_fingerprint())
    records = _Records()
    logger = logging.getLogger("anatomask_components.inference")
    logger.addHandler(records)  # the bundle's logging.conf replaces the root handlers (pytest's caplog too)
    try:
        predictions = infer(BUNDLE, tmp_path / "infer", scans, model, progress=progress)
    finally:
        logger.removeHandler(records)
    report = json.loads((predictions / "inference_report.json").read_text())
    return records.messages, report, predictions


def test_inference_logs_progress_and_seconds_per_case(tmp_path):
    messages, report, predictions = _run(tmp_path, progress=True)
    assert "[1/2] oblique: started" in messages and "[2/2] truncated: started" in messages
    windows = [m for m in messages if m.startswith("[1/2] oblique: sliding window ")]
    pattern = r"\[1/2\] oblique: sliding window (\d+)% \((\d+)/(\d+) windows, [\d.]+ s\)"
    parsed = [tuple(int(g) for g in re.fullmatch(pattern, m).groups()) for m in windows]
    assert parsed and parsed[-1][0] == 100 and parsed[-1][1] == parsed[-1][2] > 1
    assert [p[0] for p in parsed] == sorted({p[0] for p in parsed})  # increasing, no repeats
    preprocessed = next(m for m in messages if m.startswith("[1/2] oblique: preprocessed to 1x"))
    assert preprocessed.endswith(f", {parsed[-1][2]} sliding windows")
    done = f"[1/2] oblique: {predictions / 'oblique_seg.nii.gz'} ("
    assert any(m.startswith(done) and m.endswith(" s)") for m in messages)
    assert any(m.startswith("[2/2] truncated: FAILED after ") for m in messages)
    assert any(
        re.match(r"inference: 1 case\(s\) written, 1 failed in [\d.]+ s \([\d.]+ s per case\)", m)
        for m in messages
    )

    [written], [failed] = report["written"], report["failed"]
    assert written["case"] == "oblique" and written["seconds"] > 0
    stages = written["stage_seconds"]
    assert set(stages) == {"preprocess", "inferer", "network", "postprocess", "write"}
    # the network runs inside the inferer; the stages are disjoint parts of the case's time
    assert 0 < stages["network"] <= stages["inferer"]
    assert sum(v for k, v in stages.items() if k != "network") <= written["seconds"] + 0.01
    assert written["windows"] == parsed[-1][2]
    assert failed["case"] == "truncated" and failed["seconds"] >= 0
    assert report["seconds"] >= written["seconds"] + failed["seconds"] - 0.05
    assert report["seconds_per_case"] == pytest.approx(report["seconds"] / 2, abs=0.01)


def test_progress_can_be_switched_off(tmp_path):
    messages, report, _ = _run(tmp_path, progress=False)
    assert "[1/2] oblique: started" in messages
    assert not any("sliding window" in m for m in messages)
    assert [c["case"] for c in report["written"]] == ["oblique"]
    assert report["written"][0]["stage_seconds"]["network"] > 0  # timed without the progress lines
