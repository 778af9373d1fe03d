"""Shared pieces of the pretraining tests: a tiny STU-Net and a stand-in engine for AnatoMaskIteration."""

from __future__ import annotations

from types import SimpleNamespace

import torch

# mask unit 8^3: 64 patches on a 32^3 crop, 38 masked at ratio 0.6, 19 of them hard at r_t = 0.5
TINY_STUNET = {"depths": [1] * 5, "dims": [8, 16, 32, 64, 64], "strides": [[2, 2, 2]] * 3 + [[1, 1, 1]]}


def iteration_engine(network: torch.nn.Module, iteration: int = 1, fused: bool = False) -> SimpleNamespace:
    """What ``AnatoMaskIteration`` and ``EMATeacher`` read of an Ignite engine: network, AdamW, state."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=fused)
    state = SimpleNamespace(
        device=torch.device("cpu"), iteration=iteration, epoch=1, epoch_length=1, max_epochs=1
    )
    return SimpleNamespace(network=network, optimizer=optimizer, state=state)
