"""Arithmetic precision of a network pass: fp32, or bf16 / fp16 autocast (docs/method.md §6.1)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Literal

import torch

__all__ = ["PRECISIONS", "Precision", "autocast", "check_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")


def check_precision(name: str, value: str) -> None:
    """Raise ``ValueError`` naming the option ``name`` unless ``value`` is one of :data:`PRECISIONS`."""
    if value not in PRECISIONS:
        raise ValueError(f"{name} must be 'fp32', 'bf16' or 'fp16', got {value!r}.")


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """The context that runs a pass in ``precision`` on ``device``: nothing for fp32, else autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
