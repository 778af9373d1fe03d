"""Optimiser parameter groups: no weight decay on norms, biases and mask tokens."""

from __future__ import annotations

import torch

from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.optim import parameter_groups


def tiny_model() -> AnatoMaskPretrainModel:
    torch.manual_seed(0)
    return AnatoMaskPretrainModel(STUNet(1, 1, depths=(1,) * 6, dims=(8, 16, 32, 32, 32, 32)))


def names_of(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_split_decayed_and_undecayed_parameters():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed, undecayed = names_of(model, decay), names_of(model, no_decay)
    all_names = {n for n, _ in model.named_parameters()}
    assert decayed | undecayed == all_names and not decayed & undecayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(all_names)
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        is_norm = isinstance(owner, torch.nn.modules.instancenorm._InstanceNorm | torch.nn.BatchNorm3d)
        if name.startswith("mask_tokens") or name.endswith(".bias") or is_norm:
            assert name in undecayed, name
        else:
            assert p.ndim == 5 and name in decayed, name
    # explicit examples of each kind
    assert "sparse_encoder.sp_cnn.conv_blocks_context.0.0.conv1.weight" in decayed
    assert "dense_decoder.dec.0.up_sample.weight" in decayed  # transposed conv
    assert "dense_decoder.dec.0.conv.0.weight" in decayed
    assert "sparse_encoder.sp_cnn.conv_blocks_context.0.0.conv1.bias" in undecayed
    assert "sparse_encoder.sp_cnn.conv_blocks_context.0.0.norm1.weight" in undecayed
    assert "dense_decoder.dec.0.conv.1.weight" in undecayed  # BatchNorm weight
    # mask tokens are (1, C, 1, 1, 1): excluded by name, not by their number of dimensions
    assert all(t.ndim == 5 for t in model.mask_tokens)
    assert {f"mask_tokens.{i}" for i in range(len(model.mask_tokens))} <= undecayed


def test_decay_all_puts_every_parameter_in_the_decayed_group():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, weight_decay=1e-5, decay_all=True)
    assert no_decay["params"] == []
    assert len(decay["params"]) == len(list(model.parameters()))
    assert decay["weight_decay"] == 1e-5
    torch.optim.AdamW([decay, no_decay], lr=1e-4)  # an empty group is accepted


def test_frozen_parameters_are_left_out():
    model = tiny_model()
    model.sparse_encoder.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=0.1)
    listed = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in listed for p in model.sparse_encoder.parameters())
    assert all(id(p) in listed for p in model.dense_decoder.parameters())


def test_adamw_shrinks_only_the_decayed_group():
    model = tiny_model()
    groups = parameter_groups(model, weight_decay=0.5)
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay moves a parameter
    opt.step()
    decayed = names_of(model, groups[0])
    for name, p in model.named_parameters():
        if name in decayed:
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, before[name]), name
