"""SelfMedHPM through the bundles: ViT MAE + HPM pretraining, then a UNETR fine-tuning from its encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from finetune_common import BUNDLES, workflow
from ignite.engine import Events
from monai.networks.nets import UNETR

from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.handlers import PretrainedWeightsLoader
from anatomask_components.masking import num_hard, num_masked

PRETRAIN = "anatomask_pretrain"
PRETRAIN_CONFIGS = ["train.json", "train_selfmedhpm.json"]
# hidden sizes divisible by 6 (3D sin-cos position embeddings) and by the heads; 12 layers as UNETR's
TINY_VIT = {
    "vit_hidden_size": 48,
    "vit_mlp_dim": 64,
    "vit_num_heads": 4,
    "vit_decoder_hidden_size": 24,
    "vit_decoder_mlp_dim": 32,
    "vit_decoder_num_layers": 2,
    "vit_decoder_num_heads": 4,
}
ROI = [48, 48, 48]  # 27 patches of 16^3
VIT_TENSORS = 3 + 12 * 13 + 2  # patch embedding, 12 transformer blocks, final norm (tests/test_hpm.py)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hpm_scans")
    write_phantom_dataset(root, n_cases=2, shape=(52, 52, 52), layout="folder", seed=5)
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A FLARE22-like datalist: one training, one validation and one test phantom."""
    root = tmp_path_factory.mktemp("hpm_labelled")
    datalist = write_phantom_dataset(
        root, n_cases=3, shape=(40, 40, 40), num_classes=14, fractions=(0.34, 0.33, 0.33)
    )
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    return root / "datalist.json"


def test_properties(scans, tmp_path):
    flow = workflow(PRETRAIN, PRETRAIN_CONFIGS, "train", bundle_root=str(tmp_path), dataset_dir=str(scans))
    assert flow.check_properties() == []
    masking = flow.parser["masking"]
    assert masking["_target_"] == "anatomask_components.strategies.LossPredictorMasking"
    assert masking["mask_ratio"] == "@mask_ratio" and flow.parser["mask_ratio"] == 0.75
    assert flow.parser["network_def"]["_target_"].endswith("MAEPretrainModel")


@pytest.mark.parametrize(
    "bundle", ["anatomask_finetune_flare22", "anatomask_finetune_amos22", "anatomask_finetune_autopet"]
)
def test_unetr_override_properties(bundle, labelled, tmp_path):
    flow = workflow(
        bundle,
        ["train.json", "unetr_override.json"],
        "train",
        bundle_root=str(tmp_path),
        dataset_dir=str(labelled),
    )
    assert flow.check_properties() == []
    override = json.loads((BUNDLES / bundle / "configs" / "unetr_override.json").read_text())
    pretrain = json.loads((BUNDLES / PRETRAIN / "configs" / "train_selfmedhpm.json").read_text())
    # the fine-tuning UNETR is the pretraining ViT: same crop and encoder shape
    for key in (
        "roi_size",
        "vit_hidden_size",
        "vit_mlp_dim",
        "vit_num_heads",
        "vit_proj_type",
        "vit_qkv_bias",
    ):
        assert override[key] == pretrain[key], key
    assert pretrain["vit_num_layers"] == 12 and pretrain["vit_patch_size"] == 16  # fixed in UNETR


def test_unetr_override_serves_inference(labelled, tmp_path):
    """The override reads only keys that the inference config defines too."""
    infer = workflow(
        "anatomask_finetune_flare22",
        ["inference.json", "unetr_override.json"],
        "infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(labelled.parent / "images"),
    )
    assert infer.check_properties() == []
    assert type(infer.parser.get_parsed_content("network")) is UNETR


@pytest.mark.slow
def test_vit_hpm_pretraining_then_unetr_finetuning(scans, labelled, tmp_path):
    pretrain_root = tmp_path / "pretrain"
    flow = workflow(
        PRETRAIN,
        PRETRAIN_CONFIGS,
        "train",
        bundle_root=str(pretrain_root),
        dataset_dir=str(scans),
        roi_size=ROI,
        batch_size=1,
        max_epochs=1,
        num_workers=0,
        rotate_prob=0.0,
        scale_prob=0.0,
        hard_ratio_start=0.5,
        hard_ratio_end=0.5,
        **TINY_VIT,
    )
    trainer = flow.parser.get_parsed_content("train#trainer")
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    flow.run()
    assert len(outputs) == 2
    k = num_hard(num_masked(27, 0.75), 0.5)
    assert [o["num_hard"] for o in outputs] == [k, k] and k == 10
    for o in outputs:
        assert all(math.isfinite(float(o[key])) for key in ("loss", "reconstruction_loss", "predictor_loss"))
    encoder_path = pretrain_root / "models" / "encoder.pt"
    encoder = torch.load(encoder_path, weights_only=True)
    assert len(encoder) == VIT_TENSORS

    # fine-tune FLARE22's UNETR from that encoder: two iterations on phantoms
    finetune_root = tmp_path / "finetune"
    flow = workflow(
        "anatomask_finetune_flare22",
        ["train.json", "small_override.json", "unetr_override.json"],
        "train",
        bundle_root=str(finetune_root),
        dataset_dir=str(labelled),
        pretrained_weights=str(encoder_path),
        roi_size=ROI,
        unetr_feature_size=8,
        **{k: v for k, v in TINY_VIT.items() if not k.startswith("vit_decoder")},
    )
    trainer = flow.parser.get_parsed_content("train#trainer")
    network = flow.parser.get_parsed_content("network")
    assert isinstance(network, UNETR)
    losses = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item())
    )
    flow.run()
    assert trainer.state.iteration == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    loader = next(
        h for h in flow.parser.get_parsed_content("train#handlers") if isinstance(h, PretrainedWeightsLoader)
    )
    report = loader.report
    total = len(network.state_dict())
    assert report.num_network_tensors == total
    assert report.num_transferred == len(report.loaded) == VIT_TENSORS
    assert len(report.missing) == total - VIT_TENSORS and report.unused == [] and not report.shape_mismatch
    written = json.loads((finetune_root / "runs" / "weight_transfer.json").read_text())
    assert written["num_transferred"] == VIT_TENSORS
    saved = torch.load(finetune_root / "models" / "model.pt", weights_only=True)
    UNETR(1, 14, ROI, feature_size=8, hidden_size=48, mlp_dim=64, num_heads=4).load_state_dict(
        saved, strict=True
    )
