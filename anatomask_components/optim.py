"""Optimiser parameter groups."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["parameter_groups"]

_NO_DECAY_KEYS = ("mask_token",)


def parameter_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """AdamW parameter groups without weight decay on norms, biases and mask tokens.

    SparK excludes every 1-D parameter (norm weights, biases) and the mask tokens from weight decay;
    the AnatoMask reference (nnU-Net's optimiser) decays every parameter, which ``decay_all`` restores.

    Args:
        model: the network.
        weight_decay: decay of the decayed group.
        decay_all: put every parameter in the decayed group (reference behaviour).

    Returns:
        two parameter groups for ``torch.optim.AdamW``.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not decay_all and (
            p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _NO_DECAY_KEYS)
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
