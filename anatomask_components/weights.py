"""Transfer pretrained weights into a fine-tuning STU-Net, from every checkpoint format the project meets.

Formats read (the format is recognised from the file's content, not its name):

- the pretraining bundle's ``models/encoder.pt``: a flat state dict under official STU-Net keys
  (``conv_blocks_context.0.*`` .. ``conv_blocks_context.4.*``);
- the pretraining bundle's ``models/model.pt``: the flat state dict of the whole pretraining network;
  encoder tensors are ``sparse_encoder.sp_cnn.<STU-Net key>``, the rest (``densify_*``, ``mask_tokens.*``,
  ``dense_decoder.*``) is reported as unused;
- the pretraining bundle's training checkpoints ``checkpoint_*.pt``: ``{"student": ..., "teacher": ...}``
  (the student by default, ``network_key="teacher"`` for the EMA teacher);
- reference AnatoMask SSL checkpoints: ``{"network_weights": {"module.sparse_encoder.sp_cnn.<key>": ...}}``;
  like the reference fine-tuning loader, only the tensors under ``sp_cnn.`` are used;
- official STU-Net checkpoints: nnU-Net v1 ``.model`` files (``state_dict``) and nnU-Net v2 ``.pth`` files
  (``network_weights``), with or without DDP's ``module.`` prefixes;
- any flat state dict of a STU-Net, or MONAI's nested ``{"model": state_dict}``.

For a network that holds a MONAI ``ViT`` as ``vit`` (MONAI's ``UNETR``), the ViT encoder is loaded instead
(:func:`vit_key_map`), from:

- the pretraining bundle's ``models/encoder.pt`` of a ViT masked autoencoder
  (:class:`~anatomask_components.networks.MAEPretrainModel`): the keys of MONAI's ``ViT``
  (``patch_embedding.*``, ``blocks.{i}.*``, ``norm.*``);
- its ``models/model.pt`` or training checkpoints (MONAI ``MaskedAutoEncoderViT`` keys: the final LayerNorm
  is ``blocks.{num_layers}.*``; class token, decoders and loss predictor are reported as unused);
- a ``UNETR`` state dict (keys ``vit.*`` and the convolutional decoder), e.g. a fine-tuned ``model.pt``.

Files are read with ``torch.load(weights_only=True)``, which never runs code from the file. NumPy scalars,
dtypes and arrays (which nnU-Net stores in its training logs) are allowed; a file that needs any other
pickled Python object is refused with an error that names it.

A network tensor is loaded when the file holds a tensor of the same name and shape. Tensors whose shape
differs are left at their initial values and reported (e.g. segmentation heads trained for another number
of classes), except the input convolutions, whose input channels are adapted:

**Input-channel rule.** When the file's input convolution has ``C_src`` input channels and the network's
has ``C_dst``, every target channel receives the mean of the source kernels over their input channels,
scaled by ``C_src / C_dst``: ``w_dst[:, j] = (C_src / C_dst) * mean_i w_src[:, i]``. For 1-channel CT
weights in a 2-channel PET/CT network this is the pretrained kernel divided by 2 in both channels, so an
input whose channels are all equal gets exactly the pretrained network's response, whatever the order of
the channels (the usual "inflation" of pretrained input layers).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from anatomask_components.networks.contract import fine_tuning_contract
from anatomask_components.networks.stunet import STUNET_INPUT_CONV_KEYS, stunet_key_map
from anatomask_components.networks.vit import VIT_INPUT_CONV_KEYS, vit_key_map
from anatomask_components.teacher import unwrap_model

__all__ = [
    "STUNET_INPUT_CONV_KEYS",
    "VIT_INPUT_CONV_KEYS",
    "WeightTransferReport",
    "adapt_input_channels",
    "extract_state_dict",
    "load_checkpoint",
    "stunet_key_map",
    "transfer_weights",
    "vit_key_map",
]

logger = logging.getLogger(__name__)

# STUNET_INPUT_CONV_KEYS / stunet_key_map (networks.stunet) and VIT_INPUT_CONV_KEYS / vit_key_map
# (networks.vit) live beside their networks; they are re-exported here.


def _numpy_safe_globals() -> list[Any]:
    """NumPy globals needed to unpickle numpy scalars, dtypes and arrays: data only, no code.

    Files written with NumPy 1.x name the module ``numpy.core``, NumPy 2 names it ``numpy._core``; both
    spellings are allowed.
    """
    # NumPy 1.26 has a numpy._core stub without a multiarray attribute until imported (MONAI Label's pins)
    numpy2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
    multiarray = np._core.multiarray if numpy2 else np.core.multiarray
    allowed: list[Any] = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    # NumPy >= 1.25 pickles dtypes through their classes (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


@dataclass
class WeightTransferReport:
    """What :func:`transfer_weights` did, tensor by tensor.

    Attributes:
        source: the file (or ``"<in-memory state dict>"``).
        source_format: the recognised checkpoint format.
        num_network_tensors: tensors in the network's state dict.
        loaded: network keys copied unchanged from the file.
        adapted: network keys loaded after adapting their input channels -> what was done.
        missing: network keys absent from the file (left at their initial values).
        shape_mismatch: network keys whose file tensor has another shape -> (file shape, network shape)
            (left at their initial values).
        unused: keys of the file (as stored) that were not loaded, shape mismatches included.
    """

    source: str
    source_format: str
    num_network_tensors: int
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    @property
    def num_transferred(self) -> int:
        """Network tensors that now hold pretrained values (copied or adapted)."""
        return len(self.loaded) + len(self.adapted)

    @property
    def num_initial(self) -> int:
        """Network tensors left at their initial values."""
        return len(self.missing) + len(self.shape_mismatch)

    def summary(self) -> str:
        """A few lines for the log: counts, then the groups of tensors left out."""
        lines = [
            f"pretrained weights from {self.source} ({self.source_format}): "
            f"{self.num_transferred} of {self.num_network_tensors} network tensors loaded "
            f"({len(self.loaded)} copied, {len(self.adapted)} adapted), {self.num_initial} left at their "
            f"initial values ({len(self.missing)} not in the file, {len(self.shape_mismatch)} with another "
            "shape); "
            f"{len(self.unused)} tensors of the file unused"
        ]
        for key, how in self.adapted.items():
            lines.append(f"  adapted {key}: {how}")
        for key, (file_shape, net_shape) in self.shape_mismatch.items():
            lines.append(f"  shape mismatch {key}: file {list(file_shape)}, network {list(net_shape)}")
        if self.missing:
            lines.append(f"  not in the file: {_group_keys(self.missing)}")
        if self.unused:
            lines.append(f"  unused file tensors: {_group_keys(self.unused)}")
        return "\n".join(lines)


def _group_keys(keys: Sequence[str]) -> str:
    """Keys grouped by their first parts: ``"conv_blocks_context.{5}.* (10), seg_outputs.{0,1}.* (4)"``."""
    groups: dict[str, list[str]] = {}
    counts: Counter[str] = Counter()
    for key in keys:
        first, _, rest = key.partition(".")
        second = rest.split(".")[0] if rest else ""
        groups.setdefault(first, [])
        if second and second not in groups[first]:
            groups[first].append(second)
        counts[first] += 1
    return ", ".join(
        f"{first}.{{{','.join(seconds)}}}.* ({counts[first]})" if seconds else f"{first} ({counts[first]})"
        for first, seconds in groups.items()
    )


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint with ``torch.load(weights_only=True)`` on the CPU.

    Args:
        path: the file.

    Returns:
        the unpickled content (tensors, containers, numbers, strings, NumPy values).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file needs pickled Python objects that a weights-only load refuses ("refused to
            load: the file would run code when loaded", naming them), or it is not a readable PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file does not exist: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refusal = next((line for line in lines if _is_refusal(line)), None)
        if refusal is None or isinstance(error, (EOFError, OSError)):
            # "Weights only load failed" heads every weights-only failure, plain text files included.
            detail = next(
                (line for line in lines if "unsupported" in line.lower() or "load key" in line), None
            )
            detail = detail or (lines[0] if lines else "")
            raise ValueError(
                f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {detail})"
            ) from error
        try:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # legacy (non-zip) files cannot be scanned; the loader's message names the global
            unsafe = refusal
        raise ValueError(
            f"{path}: refused to load: the file would run code when loaded. It holds pickled Python objects "
            f"({unsafe or refusal}), and only tensors and NumPy values are read (torch.load "
            "weights_only=True). If you trust the file, load it yourself with torch.load(..., "
            "weights_only=False) and save just its state dict with torch.save(state_dict, 'weights.pt')."
        ) from error


# How torch's weights-only unpickler words a refused global; its wording and case vary across versions
# ("Unsupported global: GLOBAL x", "unsupported GLOBAL x whose module is blocked", "Unsupported class x",
# "... allowlisted via add_safe_globals, but got <class x>", "reduce for unrecognized function x").
_REFUSAL_MARKERS = ("unsupported global", "unsupported class", "allowlisted", "unrecognized function")


def _is_refusal(message: str) -> bool:
    """Whether a line of a torch.load error says that the file names a Python global it refused."""
    lowered = message.lower()
    return any(marker in lowered for marker in _REFUSAL_MARKERS)


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def extract_state_dict(
    checkpoint: Any, network_key: str = "student", source: str = "<checkpoint>"
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict inside a loaded checkpoint and name its format.

    Args:
        checkpoint: what :func:`load_checkpoint` returned.
        network_key: in a training checkpoint of the pretraining bundle, which network to take:
            ``"student"`` (default) or ``"teacher"``.
        source: named in errors.

    Returns:
        the flat state dict as stored (keys unchanged) and a description of the format.

    Raises:
        ValueError: no state dict is found, or ``network_key`` is not in a training checkpoint.
    """
    if _is_state_dict(checkpoint):
        return dict(checkpoint), "flat state dict"
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{source}: expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}"
        )
    if "network_weights" in checkpoint and _is_state_dict(checkpoint["network_weights"]):
        return dict(checkpoint["network_weights"]), "nnU-Net v2 checkpoint ('network_weights')"
    if "state_dict" in checkpoint and _is_state_dict(checkpoint["state_dict"]):
        return dict(checkpoint["state_dict"]), "nnU-Net v1 checkpoint ('state_dict')"
    if "student" in checkpoint or "teacher" in checkpoint:
        if network_key not in checkpoint:
            raise ValueError(
                f"{source}: training checkpoint without {network_key!r}; it holds {sorted(checkpoint)}"
            )
        entry = checkpoint[network_key]
        # The EMA teacher handler saves {"teacher": state_dict, "last_momentum": m}.
        if (
            not _is_state_dict(entry)
            and isinstance(entry, Mapping)
            and _is_state_dict(entry.get(network_key))
        ):
            entry = entry[network_key]
        if not _is_state_dict(entry):
            raise ValueError(f"{source}: {network_key!r} of the training checkpoint holds no state dict")
        return dict(entry), f"AnatoMask training checkpoint ({network_key!r})"
    if "model" in checkpoint and _is_state_dict(checkpoint["model"]):
        return dict(checkpoint["model"]), "MONAI checkpoint ('model')"
    raise ValueError(
        f"{source}: no state dict found; top-level keys are {sorted(map(str, checkpoint))[:10]} (expected a "
        "flat state dict, 'network_weights', 'state_dict', 'student'/'teacher' or 'model')"
    )


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a convolution kernel to another number of input channels (the module docstring's rule).

    Args:
        weight: ``(C_out, C_src, *kernel)`` pretrained kernel.
        in_channels: ``C_dst``.

    Returns:
        ``(C_out, C_dst, *kernel)``: every channel is ``(C_src / C_dst) * mean over the source channels``.
    """
    source_channels = weight.shape[1]
    mean = weight.mean(dim=1, keepdim=True) * (source_channels / in_channels)
    return mean.expand(-1, in_channels, *weight.shape[2:]).clone()


def transfer_weights(
    network: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    network_key: str = "student",
    adapt_channels: bool = True,
    input_conv_keys: Sequence[str] | None = None,
    require_all: bool = False,
    strict_shapes: bool = False,
) -> WeightTransferReport:
    """Load pretrained weights into ``network`` by name, and report what was loaded and what was not.

    The network says how its keys are named in a checkpoint and which convolutions read the input image
    (:func:`~anatomask_components.networks.fine_tuning_contract`: STU-Net declares it on its class, the
    contract of MONAI's UNETR is registered in :mod:`anatomask_components.networks.vit`).

    Network tensors that the file holds under another shape are left at their initial values with a warning
    naming each one and both shapes (a checkpoint of another network: AMOS22's 16-class model in a
    14-class FLARE22 network leaves the output heads random); ``strict_shapes`` makes that an error.

    Args:
        network: the fine-tuning network (a :class:`~anatomask_components.networks.STUNet`, or a network
            with a MONAI ``ViT`` as ``vit`` such as ``UNETR``; DDP wrappers are unwrapped). Its tensors are
            overwritten in place.
        source: a checkpoint file in any format of the module docstring, or an already loaded checkpoint.
        network_key: for training checkpoints of the pretraining bundle: ``"student"`` or ``"teacher"``.
        adapt_channels: adapt ``input_conv_keys`` whose input channels differ (rule in the module
            docstring); when False they are reported as shape mismatches.
        input_conv_keys: the network keys of the convolutions that read the input image; None: the
            network's own (:func:`~anatomask_components.networks.fine_tuning_contract`:
            :data:`STUNET_INPUT_CONV_KEYS`, or :data:`VIT_INPUT_CONV_KEYS` for a ViT network).
        require_all: raise unless every network tensor is loaded (e.g. for official STU-Net weights with
            the same classes, or for a fine-tuned ``model.pt``).
        strict_shapes: raise instead of warning when a tensor of the file has another shape than the
            network's (tensors the file does not hold at all, like a decoder after an encoder-only file,
            are expected and only reported).

    Returns:
        the :class:`WeightTransferReport`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file or format, no tensor matches the network (the message names the file
            and shows keys of both), ``require_all`` and some tensors were not loaded, or ``strict_shapes``
            and some tensors have another shape.

    Warns:
        UserWarning: network tensors left at their initial values because of a shape mismatch.
    """
    name = str(source) if not isinstance(source, Mapping) else "<in-memory state dict>"
    checkpoint = load_checkpoint(source) if not isinstance(source, Mapping) else source
    file_state, source_format = extract_state_dict(checkpoint, network_key, name)
    net = unwrap_model(network)
    contract = fine_tuning_contract(net)
    key_map = contract.key_map(list(file_state))
    if input_conv_keys is None:
        input_conv_keys = contract.input_conv_keys
    target = net.state_dict()
    report = WeightTransferReport(source=name, source_format=source_format, num_network_tensors=len(target))
    updates: dict[str, torch.Tensor] = {}
    for key, current in target.items():
        if key not in key_map:
            report.missing.append(key)
            continue
        stored = file_state[key_map[key]]
        if stored.shape == current.shape:
            updates[key] = stored
            report.loaded.append(key)
        elif (
            adapt_channels
            and key in input_conv_keys
            and stored.ndim == current.ndim >= 3
            and stored.shape[0] == current.shape[0]
            and stored.shape[2:] == current.shape[2:]
        ):
            updates[key] = adapt_input_channels(stored, current.shape[1])
            report.adapted[key] = (
                f"input channels {stored.shape[1]} -> {current.shape[1]}: mean over the file's channels "
                f"x {stored.shape[1]}/{current.shape[1]} in every channel"
            )
        else:
            report.shape_mismatch[key] = (tuple(stored.shape), tuple(current.shape))
    used = {key_map[k] for k in updates}
    report.unused = [k for k in file_state if k not in used]
    if not updates:
        raise ValueError(
            f"{name}: none of its {len(file_state)} tensors ({source_format}) matches the network by name "
            f"and shape; file keys look like {list(file_state)[:3]}, network keys like {list(target)[:3]}"
        )
    if require_all and report.num_initial:
        raise ValueError(f"{name}: not every network tensor was loaded\n{report.summary()}")
    if report.shape_mismatch:
        mismatches = "; ".join(
            f"{key}: file {list(file_shape)}, network {list(net_shape)}"
            for key, (file_shape, net_shape) in report.shape_mismatch.items()
        )
        message = (
            f"{name}: {len(report.shape_mismatch)} of {report.num_network_tensors} network tensors have "
            f"another shape in the file and keep their initial (random) values: {mismatches}"
        )
        if strict_shapes:
            raise ValueError(f"{message}; refused (strict_shapes)")
        warnings.warn(f"{message}; is it a checkpoint of another network?", stacklevel=2)
    with torch.no_grad():
        for key, value in updates.items():
            target[key].copy_(value)
    return report
