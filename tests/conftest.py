"""Shared pytest configuration for the whole test suite."""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    # The tests run tiny networks. On CPU cores shared with other jobs, intra-op threads mostly wait
    # for each other (3D convolutions measured 20-30x slower with 2 threads than with 1 under load),
    # so use one thread unless the caller chose otherwise.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
