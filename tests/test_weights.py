"""Weight transfer into fine-tuning STU-Nets from every supported checkpoint layout."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from anatomask_components.checkpointing import atomic_save
from anatomask_components.handlers import PretrainedWeightsLoader
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet, fine_tuning_contract
from anatomask_components.networks.stunet import stunet_filter_fn, stunet_key_map, stunet_preset
from anatomask_components.teacher import EMATeacher
from anatomask_components.weights import (
    STUNET_INPUT_CONV_KEYS,
    adapt_input_channels,
    load_checkpoint,
    transfer_weights,
)

TINY = stunet_preset("tiny")  # depths [1] * 5, widths 8-64, strides [2,2,2] x 3 + [1,1,1]
STUNET_B_TENSORS = 130  # 6 context stages x 10, 5 upsamplings x 2, 5 localization stages x 10, 5 heads x 2
SEG_HEAD_KEYS = {f"seg_outputs.{u}.{p}" for u in range(5) for p in ("weight", "bias")}


def _encoder_keys(state: dict, stages: range) -> list[str]:
    return [k for k in state if k.startswith(tuple(f"conv_blocks_context.{s}." for s in stages))]


@pytest.fixture(scope="module")
def stunet_b_weights() -> dict[str, torch.Tensor]:
    """The state dict of a 1-channel, 105-class STU-Net-B (an official STU-Net / TotalSegmentator model)."""
    torch.manual_seed(1)
    return {k: v.clone() for k, v in STUNet(1, 105, size="B").state_dict().items()}


@pytest.fixture(scope="module")
def fresh_stunet_b() -> STUNet:
    torch.manual_seed(2)
    return STUNet(1, 105, size="B")


def test_reference_anatomask_checkpoint_loads_encoder_stages_0_to_4(
    tmp_path, stunet_b_weights, fresh_stunet_b
):
    encoder = {k: stunet_b_weights[k] for k in _encoder_keys(stunet_b_weights, range(5))}
    other = {
        "module.dense_decoder.dec.0.up_sample.weight": torch.randn(512, 256, 4, 4, 4),
        "module.densify_norms.0.weight": torch.randn(512),
        "module.densify_projs.1.weight": torch.randn(256, 256, 3, 3, 3),
        "module.mask_tokens.0": torch.randn(1, 512, 1, 1, 1),
    }
    checkpoint = {
        "network_weights": {f"module.sparse_encoder.sp_cnn.{k}": v for k, v in encoder.items()} | other,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "_best_ema": np.float64(0.25),  # nnU-Net v2 stores NumPy scalars in its training state
        "current_epoch": 999,
        "init_args": {"plans": {"configurations": {}}, "fold": 0},
    }
    path = tmp_path / "checkpoint_final.pth"
    torch.save(checkpoint, path)

    report = transfer_weights(fresh_stunet_b, path)

    assert report.num_network_tensors == STUNET_B_TENSORS
    assert len(encoder) == 50
    assert sorted(report.loaded) == sorted(encoder)
    assert report.num_transferred == 50 and not report.adapted and not report.shape_mismatch
    assert len(report.missing) == STUNET_B_TENSORS - 50
    assert sorted(report.unused) == sorted(other)
    state = fresh_stunet_b.state_dict()
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key
    assert report.source_format.startswith("nnU-Net v2")


@pytest.mark.parametrize("layout", ["v1_model", "v2_pth"])
def test_official_stunet_checkpoints_load_every_tensor(tmp_path, stunet_b_weights, fresh_stunet_b, layout):
    if layout == "v1_model":
        checkpoint = {
            "epoch": 4000,
            "state_dict": stunet_b_weights,
            "optimizer_state_dict": None,
            "plot_stuff": ([np.float64(0.9)], [np.float64(0.8)], [], [np.float32(0.5)]),
            "best_stuff": (100, np.float64(0.8), np.float64(0.85), 3),
        }
        path = tmp_path / "model_final_checkpoint.model"
    else:
        checkpoint = {
            "network_weights": {f"module.{k}": v for k, v in stunet_b_weights.items()},
            "_best_ema": np.float64(0.9),
            "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)]},
        }
        path = tmp_path / "checkpoint_final.pth"
    torch.save(checkpoint, path)

    report = transfer_weights(fresh_stunet_b, path, require_all=True)

    assert len(report.loaded) == STUNET_B_TENSORS
    assert report.num_initial == 0 and report.unused == []
    for key, value in fresh_stunet_b.state_dict().items():
        assert torch.equal(value, stunet_b_weights[key]), key


def test_other_class_count_skips_exactly_the_segmentation_heads(tmp_path, stunet_b_weights):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {f"module.{k}": v for k, v in stunet_b_weights.items()}}, path)
    network = STUNet(1, 14, size="B")
    initial_heads = {k: v.clone() for k, v in network.state_dict().items() if k in SEG_HEAD_KEYS}

    report = transfer_weights(network, path)

    assert set(report.shape_mismatch) == SEG_HEAD_KEYS
    assert report.shape_mismatch["seg_outputs.4.weight"] == ((105, 32, 1, 1, 1), (14, 32, 1, 1, 1))
    assert len(report.loaded) == STUNET_B_TENSORS - 10 and not report.missing
    assert sorted(report.unused) == sorted(f"module.{k}" for k in SEG_HEAD_KEYS)
    for key, value in network.state_dict().items():
        expected = initial_heads[key] if key in SEG_HEAD_KEYS else stunet_b_weights[key]
        assert torch.equal(value, expected), key
    with pytest.raises(ValueError, match="not every network tensor was loaded"):
        transfer_weights(STUNet(1, 14, size="B"), path, require_all=True)


def test_input_channels_adapted_by_the_documented_rule(tmp_path):
    torch.manual_seed(0)
    source = STUNet(1, 3, **TINY)
    path = tmp_path / "encoder.pt"
    atomic_save({k: v for k, v in source.state_dict().items() if k.startswith("conv_blocks_context.")}, path)
    network = STUNet(2, 3, **TINY)

    report = transfer_weights(network, path)

    assert sorted(report.adapted) == sorted(STUNET_INPUT_CONV_KEYS)
    assert len(report.loaded) == 50 - 2 and not report.shape_mismatch
    for key in STUNET_INPUT_CONV_KEYS:
        pretrained = source.state_dict()[key]
        adapted = network.state_dict()[key]
        assert adapted.shape[1] == 2
        assert torch.equal(adapted[:, 0:1], pretrained / 2) and torch.equal(adapted[:, 1:2], pretrained / 2)
    # the documented property: identical channels get exactly the pretrained response
    x = torch.randn(1, 1, 8, 8, 8)
    block_source, block_network = source.conv_blocks_context[0][0], network.conv_blocks_context[0][0]
    torch.testing.assert_close(block_network.conv1(x.repeat(1, 2, 1, 1, 1)), block_source.conv1(x))
    torch.testing.assert_close(block_network.conv3(x.repeat(1, 2, 1, 1, 1)), block_source.conv3(x))
    with pytest.raises(ValueError, match="none of its"):
        transfer_weights(
            STUNet(2, 3, **TINY),
            {k: source.state_dict()[k] for k in STUNET_INPUT_CONV_KEYS},
            adapt_channels=False,
        )


def test_adapt_input_channels_general_rule():
    weight = torch.arange(2 * 3 * 1 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1, 1)
    adapted = adapt_input_channels(weight, 2)
    expected = weight.mean(dim=1, keepdim=True) * 3 / 2
    assert adapted.shape == (2, 2, 1, 1, 1)
    assert torch.equal(adapted, expected.expand(2, 2, 1, 1, 1))
    assert torch.allclose(adapted.sum(dim=1), weight.sum(dim=1))


def test_pretraining_bundle_exports(tmp_path):
    torch.manual_seed(3)
    student = AnatoMaskPretrainModel(STUNet(1, 1, **TINY))
    teacher = EMATeacher(student)
    with torch.no_grad():
        for parameter in teacher.teacher.parameters():
            parameter.add_(1.0)  # make the teacher differ from the student
    atomic_save(student.encoder_state_dict(), tmp_path / "encoder.pt")
    atomic_save(student.state_dict(), tmp_path / "model.pt")
    checkpoint = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": torch.optim.AdamW(student.parameters()).state_dict(),
        "trainer": {"iteration": 10, "epoch_length": 5, "max_epochs": 2},
    }
    atomic_save(checkpoint, tmp_path / "checkpoint_10.pt")
    encoder = student.encoder_state_dict()
    non_encoder = [k for k in student.state_dict() if not k.startswith("sparse_encoder.")]

    for name, network_key, expected in [
        ("encoder.pt", "student", encoder),
        ("model.pt", "student", encoder),
        ("checkpoint_10.pt", "student", encoder),
        ("checkpoint_10.pt", "teacher", {k: v + 1.0 for k, v in encoder.items()}),
    ]:
        network = STUNet(1, 4, **TINY)
        report = transfer_weights(network, tmp_path / name, network_key=network_key)
        assert sorted(report.loaded) == sorted(expected), name
        assert report.num_network_tensors == 106 and len(report.missing) == 106 - 50
        assert sorted(report.unused) == ([] if name == "encoder.pt" else sorted(non_encoder))
        for key, value in expected.items():
            assert torch.equal(network.state_dict()[key], value), (name, network_key, key)


def test_nothing_matches_names_the_file(tmp_path):
    path = tmp_path / "unrelated.pt"
    torch.save({"backbone.layer1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match=r"unrelated\.pt: none of its 1 tensors"):
        transfer_weights(STUNet(1, 3, **TINY), path)


def test_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "trainer.pth"
    torch.save(
        {"network_weights": {"conv_blocks_context.0.0.conv1.bias": torch.zeros(8)}, "obj": _Opaque()}, path
    )
    with pytest.raises(ValueError, match=r"trainer\.pth: refused to load.*_Opaque"):
        load_checkpoint(path)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pt: not a"):
        load_checkpoint(not_torch)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_only_load(tmp_path, monkeypatch):
    path = tmp_path / "encoder.pt"
    torch.save(STUNet(1, 3, **TINY).state_dict(), path)
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    transfer_weights(STUNet(1, 3, **TINY), path)
    assert calls and all(call.get("weights_only") is True for call in calls)


def test_handler_logs_report_or_scratch(tmp_path, caplog):
    path = tmp_path / "encoder.pt"
    source = STUNet(1, 3, **TINY)
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("conv_blocks_context.")}, path)
    network = STUNet(1, 3, **TINY)
    with caplog.at_level(logging.INFO, logger="anatomask_components.handlers"):
        assert PretrainedWeightsLoader("", network)() is None
        report = PretrainedWeightsLoader(str(path), network)()
    assert "training from scratch" in caplog.text
    assert f"{path} (flat state dict): 50 of 106 network tensors loaded" in caplog.text
    assert report.num_transferred == 50


class _Opaque:
    """A pickled object that a weights-only load must refuse."""


def test_handler_writes_the_report_as_json(tmp_path):
    path = tmp_path / "encoder.pt"
    source = STUNet(1, 3, **TINY)
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("conv_blocks_context.")}, path)
    scratch_json, loaded_json = tmp_path / "scratch.json", tmp_path / "run" / "weight_transfer.json"
    PretrainedWeightsLoader("", STUNet(1, 3, **TINY), report_path=scratch_json)()
    assert json.loads(scratch_json.read_text()) == {"source": None, "num_network_tensors": 106}
    report = PretrainedWeightsLoader(str(path), STUNet(1, 3, **TINY), report_path=loaded_json)()
    written = json.loads(loaded_json.read_text())
    assert written["num_transferred"] == report.num_transferred == 50
    assert written["num_initial"] == 56 and written["num_network_tensors"] == 106
    assert written["loaded"] == report.loaded and written["missing"] == report.missing
    assert written["source"] == str(path) and written["summary"] == report.summary()


class _RunsCodeWhenUnpickled:
    """Unpickling this runs a shell command (``os.system``)."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.witness}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_as_such(tmp_path, zip_format):
    witness, path = tmp_path / "code_ran", tmp_path / "evil.pt"
    content = {"weight": torch.zeros(2), "payload": _RunsCodeWhenUnpickled(witness)}
    torch.save(content, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load: the file would run code") as raised:
        load_checkpoint(path)
    assert "system" in str(raised.value) and "not a readable" not in str(raised.value)
    assert not witness.exists()


@pytest.mark.parametrize(
    "message",
    [
        "Weights only load failed. ...\nWeightsUnpickler error: Unsupported global: GLOBAL os.system was not "
        "an allowed global by default.",
        "weights only load failed\nunsupported global: GLOBAL os.system",
        "Weights only load failed. ...\n\nTrying to load unsupported GLOBAL posix.system whose module "
        "posix is blocked.",
        "WEIGHTS ONLY LOAD FAILED: UNSUPPORTED GLOBAL: GLOBAL os.system",
        "Weights only load failed. WeightsUnpickler error: Unsupported class os.system",
        "Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got "
        "<class 'os.system'>",
    ],
)
def test_the_refusal_is_recognised_whatever_the_wording(tmp_path, monkeypatch, message):
    import pickle

    path = tmp_path / "weights.pt"
    torch.save({}, path)

    def refusing_load(*args, **kwargs):
        raise pickle.UnpicklingError(message)

    monkeypatch.setattr(torch, "load", refusing_load)
    with pytest.raises(ValueError, match=r"weights\.pt: refused to load: the file would run code") as raised:
        load_checkpoint(path)
    assert "system" in str(raised.value)


def test_a_weights_only_failure_without_a_global_is_not_a_refusal(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(
        ValueError, match=r"notes\.pt: not a readable PyTorch checkpoint.*Unsupported operand"
    ):
        load_checkpoint(path)  # torch: "Weights only load failed ... Unsupported operand 110"

    def failing_load(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. invalid load key, 'n'.")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(ValueError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_network_warns_with_every_tensor_left_random(tmp_path):
    """AMOS22's 16-class model into a 14-class FLARE22 network: the output heads cannot be loaded."""
    torch.manual_seed(0)
    path = tmp_path / "amos22_model.pt"
    atomic_save(STUNet(1, 16, **TINY).state_dict(), path)
    network = STUNet(1, 14, **TINY)
    heads = {k: tuple(v.shape) for k, v in network.state_dict().items() if k.startswith("seg_outputs.")}
    assert len(heads) == 8  # 4 deep-supervision heads, weight and bias

    with pytest.warns(UserWarning) as caught:
        report = transfer_weights(network, path)

    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        f"{path}: 8 of {report.num_network_tensors} network tensors have another shape in the file and keep "
        "their initial (random) values: seg_outputs.0.weight: file [16, 64, 1, 1, 1], network "
        "[14, 64, 1, 1, 1]; "
    )
    for key, shape in heads.items():
        assert f"{key}: file {[16, *shape[1:]]}, network {list(shape)}" in message
    assert message.endswith("; is it a checkpoint of another network?")
    assert report.num_transferred == report.num_network_tensors - 8

    with pytest.raises(
        ValueError, match=r"8 of \d+ network tensors have another shape.*refused \(strict_shapes\)"
    ):
        transfer_weights(STUNet(1, 14, **TINY), path, strict_shapes=True)
    # an encoder-only file leaves the decoder out by design: no warning, and strict has nothing to refuse
    encoder = {
        k: v for k, v in STUNet(1, 16, **TINY).state_dict().items() if k.startswith("conv_blocks_context.")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = transfer_weights(STUNet(1, 14, **TINY), encoder, strict_shapes=True)
    assert report.missing and not report.shape_mismatch


def test_stunet_declares_its_fine_tuning_contract():
    """transfer_weights asks the network: STU-Net's input convolutions and key map sit on its class."""
    network = STUNet(1, 3, **TINY)
    contract = fine_tuning_contract(network)
    assert contract.input_conv_keys == STUNET_INPUT_CONV_KEYS == STUNet.input_conv_keys
    student = AnatoMaskPretrainModel(STUNet(1, 1, **TINY)).state_dict()
    assert contract.key_map(list(student)) == stunet_key_map(list(student))
    # timm-style filter: the sparse encoder's tensors under STU-Net keys, loadable into the network
    filtered = STUNet.pretrained_filter_fn(student)
    assert filtered.keys() == stunet_filter_fn(student).keys() == contract.filter_state_dict(student).keys()
    assert all(key.startswith("conv_blocks_context.") for key in filtered)
    network.load_state_dict(filtered, strict=False)
    # any other network is taken for a STU-Net, as before
    assert fine_tuning_contract(torch.nn.Linear(2, 2)).input_conv_keys == STUNET_INPUT_CONV_KEYS
