"""The Model Zoo's network checks on the bundles: TorchScript (``torch.jit.script``, ``ckpt_export``) of the
fine-tuning STU-Nets and ``verify_net_in_out`` of every bundle's ``network_def``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata

from anatomask_components.bundle_builder import discover_bundles, finetune_bundles

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
FINETUNE = list(finetune_bundles())
ALL_BUNDLES = list(discover_bundles())
SMALL = "['configs/{config}','configs/small_override.json']"
SHAPE = [32, 32, 32]  # divisible by the small network's total stride (8)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_network(bundle: str) -> tuple[torch.nn.Module, int]:
    """``network_def`` of train.json with the small override (deep supervision on), and its input channels."""
    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "small_override.json")])
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("in_channels")


def monai_bundle(bundle: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle *args`` run in the bundle folder, as the Zoo's checks run it."""
    command = [sys.executable, "-m", "monai.bundle", *args]
    done = subprocess.run(command, cwd=BUNDLES / bundle, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("bundle", FINETUNE)
def test_scripted_network_matches_eager(bundle):
    torch.manual_seed(0)
    network, in_channels = tiny_network(bundle)
    scripted = torch.jit.script(network)
    x = torch.randn(2, in_channels, *SHAPE)
    with torch.no_grad():
        network.eval()
        scripted.eval()
        torch.testing.assert_close(scripted(x), network(x), atol=1e-4, rtol=0)
        network.train()
        scripted.train()
        eager, script = network(x), scripted(x)
    # deep supervision: the 3 finest of the 4 decoder outputs, full resolution first
    assert [tuple(o.shape[2:]) for o in eager] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    assert len(script) == len(eager)
    for s, e in zip(script, eager):
        torch.testing.assert_close(s, e, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE)
def test_ckpt_export(bundle, tmp_path):
    """The Zoo's TorchScript export, in its default script mode, of a checkpoint of the small network."""
    torch.manual_seed(0)
    network, in_channels = tiny_network(bundle)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    monai_bundle(
        bundle, "ckpt_export", "network_def",
        "--filepath", str(tmp_path / "model.ts"),
        "--ckpt_file", str(tmp_path / "model.pt"),
        "--meta_file", "configs/metadata.json",
        "--config_file", SMALL.format(config="train.json"),
    )  # fmt: skip
    exported, metadata, extra = load_net_with_metadata(
        str(tmp_path / "model.ts"), more_extra_files=("train.json", "small_override.json")
    )
    assert (
        metadata["version"] == json.loads((BUNDLES / bundle / "configs/metadata.json").read_text())["version"]
    )
    assert json.loads(extra["small_override.json"])["stunet_size"] == "tiny"
    x = torch.randn(1, in_channels, *SHAPE)
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), network(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_verify_net_in_out(bundle):
    """``network_def(x)`` with one tensor gives the channels and dtype of metadata.json (small network)."""
    done = monai_bundle(
        bundle, "verify_net_in_out", "network_def",
        "--meta_file", "configs/metadata.json",
        "--config_file", SMALL.format(config="inference.json"),
        "--device", "cpu",
        "--_meta_#network_data_format#inputs#image#spatial_shape", str(SHAPE),
    )  # fmt: skip
    assert "data shape of network is verified with no error" in done.stdout + done.stderr
