"""``strict_pretrained`` in the fine-tuning bundles: a checkpoint of another network warns by default and is
refused when the key is true, through the bundle's own weights loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from anatomask_components.bundle_builder import finetune_bundles
from anatomask_components.checkpointing import atomic_save
from anatomask_components.handlers import PretrainedWeightsLoader

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
FINETUNE = list(finetune_bundles())


def _weights_loader(bundle: str, root: Path, weights: Path, strict: bool | None) -> PretrainedWeightsLoader:
    """The bundle's ``PretrainedWeightsLoader`` entry of ``train#handlers``, parsed alone (small network)."""
    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "small_override.json")])
    parser["bundle_root"] = str(root)
    parser["pretrained_weights"] = str(weights)
    if strict is not None:
        parser["strict_pretrained"] = strict
    (index,) = [
        i
        for i, handler in enumerate(parser["train"]["handlers"])
        if handler.get("_target_", "").endswith("PretrainedWeightsLoader")
    ]
    loader = parser.get_parsed_content(f"train#handlers#{index}")
    assert isinstance(loader, PretrainedWeightsLoader)
    return loader


def _other_network_checkpoint(network: torch.nn.Module, path: Path) -> list[str]:
    """Save ``network``'s state with two more output classes in every head; returns the head keys."""
    state = network.state_dict()
    heads = [k for k in state if k.startswith("seg_outputs.")]
    for key in heads:
        state[key] = torch.cat([state[key], state[key][:2]])
    atomic_save(state, path)
    return heads


@pytest.mark.parametrize("bundle", FINETUNE)
def test_a_checkpoint_of_another_network_warns_or_is_refused(bundle, tmp_path):
    assert json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())["strict_pretrained"] is False
    weights = tmp_path / "other_network.pt"
    loader = _weights_loader(bundle, tmp_path / "default", weights, strict=None)
    heads = _other_network_checkpoint(loader.network, weights)

    with pytest.warns(
        UserWarning, match=rf"{len(heads)} of \d+ network tensors have another shape"
    ) as caught:
        report = loader()
    message = " ".join(str(w.message) for w in caught)
    assert all(key in message for key in heads)
    assert report.num_transferred == report.num_network_tensors - len(heads)

    strict = _weights_loader(bundle, tmp_path / "strict", weights, strict=True)
    with pytest.raises(ValueError, match=r"refused \(strict_shapes\)"):
        strict()
