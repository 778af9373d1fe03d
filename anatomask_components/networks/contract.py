"""What the pretraining and fine-tuning code asks of a network, declared beside the networks.

- :class:`PretrainingNetwork`: the protocol of a pretraining network (the sparse CNN encoder of
  :class:`~anatomask_components.networks.AnatoMaskPretrainModel` and the ViT masked autoencoder
  :class:`~anatomask_components.networks.MAEPretrainModel`). The iteration, the HPM teacher, the exporter,
  the difficulty scorer and the reconstruction inference use nothing else of it.
- :class:`PretrainingBackbone`: what a dense CNN offers the sparse pretraining encoder
  (:class:`~anatomask_components.networks.SparseEncoder`): its encoder stages, their strides and widths
  (:class:`~anatomask_components.networks.STUNet` in the bundles; any CNN whose blocks have a sparse rule).
- :class:`FineTuningContract`: how a fine-tuning network takes pretrained weights: the keys of its
  convolutions that read the input image, and the map from a checkpoint's keys to its own (as timm's
  ``checkpoint_filter_fn`` and MONAI's ``filter_func`` sit beside their models).
  :func:`~anatomask_components.weights.transfer_weights` asks :func:`fine_tuning_contract` for it: a
  network class declares ``input_conv_keys`` and ``pretrained_key_map`` itself
  (:class:`~anatomask_components.networks.STUNet`); for MONAI classes this project does not own, the module
  that knows their keys registers a contract (:mod:`~anatomask_components.networks.vit` for ``UNETR``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = [
    "FineTuningContract",
    "KeyMap",
    "PretrainingBackbone",
    "PretrainingNetwork",
    "fine_tuning_contract",
    "register_fine_tuning_contract",
    "strip_wrapper_prefixes",
]

# Prefixes added by wrappers around a network: DistributedDataParallel/DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(key: str) -> str:
    """``key`` without the prefixes of :data:`WRAPPER_PREFIXES` (repeatedly, in any order)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


@runtime_checkable
class PretrainingNetwork(Protocol):
    """A network that the masked-image-modelling pretraining can train, guide, score and export.

    Members and who uses them:

    - ``in_channels``: the channels of the input image.
    - ``patch_size``: the mask unit ``(p0, p1, p2)``; the iteration and the inference patchify the
      reconstruction with it, the difficulty scorer tiles its windows with it.
    - ``num_patches(spatial_shape)``: the number ``L`` of mask units of a crop (the iteration's and the
      inference's masks are ``(B, L)``).
    - ``forward(x, mask, return_loss_prediction=False)``: the reconstruction ``(B, C, H, W, D)`` of ``x``
      with ``mask`` ``(B, L)`` (True = masked), and with ``return_loss_prediction`` the predicted loss
      of every patch ``(B, L)`` (the HPM student in the iteration).
    - ``loss_predictor``: the HPM loss predictor, or None; the iteration asks whether it is there.
    - ``predict_patch_losses(x, mask=None)``: the loss predictor alone, ``(B, L)`` (the HPM teacher's
      guidance in the iteration).
    - ``encoder_state_dict()``: the encoder under the keys of the fine-tuning network's encoder
      (the exporter's ``models/encoder.pt``).

    ``isinstance(model, PretrainingNetwork)`` checks that the members exist (not their signatures).
    """

    in_channels: int
    loss_predictor: nn.Module | None

    @property
    def patch_size(self) -> tuple[int, ...]: ...

    def num_patches(self, spatial_shape: Sequence[int]) -> int: ...

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, return_loss_prediction: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def predict_patch_losses(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def encoder_state_dict(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class PretrainingBackbone(Protocol):
    """A dense CNN whose encoder the sparse masked-image-modelling pretraining runs (SparK's "any CNN").

    Members:

    - ``in_channels``: the channels of the input image.
    - ``encoder_stages``: the encoder stages, finest first, an ``nn.ModuleList`` registered on the backbone
      itself: its name there gives the pretrained encoder's keys (``conv_blocks_context.*`` for STU-Net), so
      the exported encoder loads into the fine-tuning network. Every block in it needs a sparse rule
      (:func:`~anatomask_components.networks.sparse.register_sparse_rule`); plain ``nn.Sequential``,
      ``nn.Conv3d``, ``nn.InstanceNorm3d`` and ``nn.LeakyReLU`` layers have one.
    - ``encoder_strides``: the stride of each stage relative to its input, one ``(s0, s1, s2)`` per stage.
    - ``encoder_widths``: the output channels of each stage.

    ``isinstance(backbone, PretrainingBackbone)`` checks that the members exist.
    """

    in_channels: int

    @property
    def encoder_stages(self) -> nn.ModuleList: ...

    @property
    def encoder_strides(self) -> Sequence[tuple[int, int, int]]: ...

    @property
    def encoder_widths(self) -> Sequence[int]: ...


# ``{network key: file key}`` from the keys of a checkpoint
KeyMap = Callable[[Sequence[str]], dict[str, str]]


@dataclass(frozen=True)
class FineTuningContract:
    """How a fine-tuning network takes pretrained weights.

    Attributes:
        input_conv_keys: the network keys of the convolutions that read the input image (their input
            channels may be adapted to the file's).
        key_map: the file's keys -> ``{network key: file key}``; file keys it leaves out are not used.
    """

    input_conv_keys: tuple[str, ...]
    key_map: KeyMap

    def filter_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint's state dict under the network's keys (timm's ``checkpoint_filter_fn``)."""
        return filter_by_key_map(state_dict, self.key_map)


def filter_by_key_map(state_dict: Mapping[str, Any], key_map: KeyMap) -> dict[str, Any]:
    """``state_dict`` under the network keys that ``key_map`` gives; file keys it leaves out are dropped."""
    return {name: state_dict[key] for name, key in key_map(list(state_dict)).items()}


_REGISTRY: list[tuple[Callable[[nn.Module], bool], FineTuningContract]] = []


def register_fine_tuning_contract(matches: Callable[[nn.Module], bool], contract: FineTuningContract) -> None:
    """Declare the contract of networks this project does not own (``matches(network)`` picks them)."""
    _REGISTRY.append((matches, contract))


def fine_tuning_contract(network: nn.Module) -> FineTuningContract:
    """The :class:`FineTuningContract` of an (unwrapped) fine-tuning network.

    The network's own declaration (class attributes ``input_conv_keys`` and ``pretrained_key_map``) comes
    first, then the registered contracts in the order of registration; any other network is taken for a
    STU-Net (:class:`~anatomask_components.networks.STUNet`'s contract).
    """
    declared_keys = getattr(type(network), "input_conv_keys", None)
    declared_map = getattr(type(network), "pretrained_key_map", None)
    if declared_keys is not None and callable(declared_map):
        return FineTuningContract(tuple(declared_keys), declared_map)
    for matches, contract in _REGISTRY:
        if matches(network):
            return contract
    from anatomask_components.networks.stunet import STUNet

    return FineTuningContract(STUNet.input_conv_keys, STUNet.pretrained_key_map)
