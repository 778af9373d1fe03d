"""CT intensities mapped the same way in every scan: nnU-Net's CT scheme with a dataset fingerprint, computed
on the first run, stored with the weights and carried from pretraining to fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anatomask_components.cli import fingerprint as fingerprint_command
from anatomask_components.data.fingerprint import (
    FINGERPRINT_FILE,
    model_fingerprint,
    resolve_fingerprint,
    window_fingerprint,
)
from anatomask_components.data.normalization import normalize_channel
from anatomask_components.data.phantoms import phantom_fingerprint
from anatomask_components.data.preprocessing import finetune_val_transforms

LIVER = 1  # FLARE22 id


def _median_liver(item, normalization, fingerprint=None) -> float:
    out = finetune_val_transforms(
        spacing=(3.0, 3.0, 3.0), normalization=normalization, fingerprint=fingerprint, num_classes=14
    )(item)
    return float(np.median(out["image"][0][out["label"][0] == LIVER].numpy()))


@pytest.mark.network
def test_liver_of_cases_a_and_c_maps_to_the_same_value(fetched, tmp_path):
    """Case A (non-contrast, liver ~46 HU) and C (portal venous, ~93 HU, 65 % air): within 0.15 with the
    pretraining bundle's default, where per-image z-score puts them far apart."""
    dest, _ = fetched
    pretrain = json.loads((dest / "datalists" / "pretrain.json").read_text())["training"]
    flare = json.loads((dest / "datalists" / "flare22.json").read_text())
    model = tmp_path / "pretrain" / "models" / "model.pt"
    fingerprint = resolve_fingerprint(None, "ct", pretrain, model_path=model)
    assert fingerprint["source"] == "training data" and (model.parent / FINGERPRINT_FILE).is_file()
    a, c = flare["training"][0], flare["test"][0]
    liver_a, liver_c = _median_liver(a, "ct", fingerprint), _median_liver(c, "ct", fingerprint)
    assert abs(liver_a - liver_c) <= 0.15, (liver_a, liver_c)
    zscore_a, zscore_c = _median_liver(a, "zscore"), _median_liver(c, "zscore")
    assert abs(zscore_a - zscore_c) > 0.5, (zscore_a, zscore_c)  # what the per-image scheme did

    # fine-tuning from that encoder maps CT exactly as pretraining did, without being told
    encoder = model.parent / "encoder.pt"
    finetune_model = tmp_path / "finetune" / "models" / "model.pt"
    carried = resolve_fingerprint(
        None, "ct", flare["training"], model_path=finetune_model, pretrained_weights=encoder
    )
    assert carried["intensity"] == fingerprint["intensity"] and "pretrained encoder" in carried["source"]
    assert model_fingerprint(None, finetune_model)["intensity"] == fingerprint["intensity"]


@pytest.mark.network
def test_a_fixed_window_keeps_the_hu_difference_of_cases_a_and_c(fetched, tmp_path):
    """The demo's window: A's and C's livers 100 HU apart per unit, so their real contrast difference (about
    48 HU: C is portal venous) stays, and nothing moves with the share of air in a scan."""
    dest, _ = fetched
    flare = json.loads((dest / "datalists" / "flare22.json").read_text())
    fingerprint_command(output=str(tmp_path / "window.json"), window=(-160, 240))
    window = json.loads((tmp_path / "window.json").read_text())
    assert window == window_fingerprint(-160, 240)
    a, c = flare["training"][0], flare["test"][0]
    liver_a, liver_c = _median_liver(a, "ct", window), _median_liver(c, "ct", window)
    assert liver_a * 100 + 40 == pytest.approx(46, abs=3) and liver_c * 100 + 40 == pytest.approx(94, abs=3)


def test_window_fingerprint_clips_to_the_window_and_maps_it_to_plus_minus_two():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 140.0, 240.0, 1500.0])
    mapped = normalize_channel(hu, "ct", window_fingerprint(-160, 240)["intensity"]["CT"])
    assert mapped.tolist() == [-2.0, -2.0, 0.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match=r"high > low, got \[240.0, -160.0\]"):
        window_fingerprint(240, -160)
    with pytest.raises(ValueError, match="needs a datalist, or --window"):
        fingerprint_command()


def test_fingerprint_is_computed_once_stored_with_the_model_and_written_into_inference_json(
    tmp_path, make_phantom_files, capsys
):
    files = make_phantom_files(tmp_path / "data")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text(
        json.dumps({"normalization": "ct", "fingerprint": None})
    )
    model = bundle / "models" / "model.pt"
    first = resolve_fingerprint(None, "ct", [files.item()], model_path=model, bundle_root=bundle)
    assert "computing nnU-Net's CT statistics from 1 training scans" in capsys.readouterr().out
    assert first["source"] == "training data" and first["num_cases"] == 1
    written = json.loads((bundle / "configs" / "inference.json").read_text())["fingerprint"]
    assert written == first == json.loads((model.parent / FINGERPRINT_FILE).read_text())

    again = resolve_fingerprint(None, "ct", [files.item()], model_path=model, bundle_root=bundle)
    assert again == first and "reusing" in capsys.readouterr().out  # resume: not computed again

    other = make_phantom_files(tmp_path / "other", seed=4)
    changed = resolve_fingerprint(None, "ct", [other.item()], model_path=model, bundle_root=bundle)
    assert changed["files_digest"] != first["files_digest"]  # other training files: computed anew

    given = resolve_fingerprint(phantom_fingerprint(), "ct", [files.item()], model_path=model)
    assert given["intensity"] == phantom_fingerprint()["intensity"]
    assert resolve_fingerprint(None, "zscore", [files.item()], model_path=tmp_path / "z" / "model.pt") is None
    assert not (tmp_path / "z").exists()  # nothing computed or stored without the "ct" scheme
