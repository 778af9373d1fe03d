"""CT intensities mapped the same way in every scan: nnU-Net's CT scheme with a dataset fingerprint, computed
on the first run, stored with the weights and carried from pretraining to fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anatomask_components.data.fingerprint import (
    FINGERPRINT_FILE,
    model_fingerprint,
    resolve_fingerprint,
)
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
