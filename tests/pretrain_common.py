"""Shared pieces of the pretraining tests: a tiny STU-Net, an AnatoMask step and a stand-in engine for it."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.masking import HardRatioSchedule
from anatomask_components.networks.stunet import stunet_preset
from anatomask_components.strategies import TeacherReconstructionMasking
from anatomask_components.teacher import EMATeacher

# mask unit 8^3: 64 patches on a 32^3 crop, 38 masked at ratio 0.6, 19 of them hard at r_t = 0.5
TINY_STUNET = stunet_preset("tiny")  # depths [1] * 5, widths 8-64, strides [2,2,2] x 3 + [1,1,1]


def iteration_engine(network: torch.nn.Module, iteration: int = 1, fused: bool = False) -> SimpleNamespace:
    """What ``AnatoMaskIteration`` and ``EMATeacher`` read of an Ignite engine: network, AdamW, state."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=fused)
    state = SimpleNamespace(
        device=torch.device("cpu"), iteration=iteration, epoch=1, epoch_length=1, max_epochs=1
    )
    return SimpleNamespace(network=network, optimizer=optimizer, state=state)


def guided_iteration(
    teacher: EMATeacher, strategy_options: Mapping[str, Any] | None = None, **options
) -> AnatoMaskIteration:
    """AnatoMask masking at ratio 0.6 with the hard ratio held at 0.5 (on ``TINY_STUNET``'s 32^3 crop: 19 of
    the 38 masked patches chosen by the teacher); ``strategy_options`` go to ``TeacherReconstructionMasking``
    (``target``, ``lowest``, ``precision``), ``options`` to ``AnatoMaskIteration``."""
    schedule = HardRatioSchedule(total_epochs=1, start=0.5, end=0.5)
    masking = TeacherReconstructionMasking(teacher, schedule, 0.6, **(strategy_options or {}))
    return AnatoMaskIteration(masking, **options)
