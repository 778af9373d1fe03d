"""A ViT masked autoencoder that takes its mask from outside, with HPM's loss predictor (docs/method.md §12).

MONAI's :class:`~monai.networks.nets.MaskedAutoEncoderViT` draws its own random mask inside ``forward``
(``torch.multinomial``, on the CPU, without a generator), so a guided or reproducible mask cannot be given
to it. :class:`MAEPretrainModel` keeps its modules (and so its state-dict keys) and replaces ``forward`` by
one with the interface of :class:`~anatomask_components.networks.AnatoMaskPretrainModel`:
``model(x, mask)`` with ``mask`` ``(B, L)`` bool over the 16^3 patch grid, in the same raster order as
:func:`~anatomask_components.patches.patchify`. Every AnatoMask, SparK and HPM component (iteration,
teacher, losses, exporter) therefore works with either network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.layers import trunc_normal_
from monai.networks.nets import MaskedAutoEncoderViT, ViT

from anatomask_components.networks.contract import (
    FineTuningContract,
    PretrainingNetwork,
    filter_by_key_map,
    register_fine_tuning_contract,
    strip_wrapper_prefixes,
)
from anatomask_components.patches import patch_grid, unpatchify

__all__ = [
    "VIT_INPUT_CONV_KEYS",
    "MAEPretrainModel",
    "TransformerLossDecoder",
    "holds_monai_vit",
    "vit_filter_fn",
    "vit_key_map",
]

# The patch embedding of a UNETR's ViT reads the input image (a convolution with proj_type="conv").
VIT_INPUT_CONV_KEYS: tuple[str, ...] = ("vit.patch_embedding.patch_embeddings.weight",)


def holds_monai_vit(network: nn.Module) -> bool:
    """Whether ``network`` holds a MONAI ``ViT`` as ``vit`` (MONAI's ``UNETR``): the fine-tuning network
    that takes the encoder of :class:`MAEPretrainModel`."""
    return isinstance(getattr(network, "vit", None), ViT)


def vit_key_map(keys: Sequence[str]) -> dict[str, str]:
    """Map the keys of a file to the keys of a network holding a MONAI ``ViT`` under ``vit.`` (UNETR).

    Wrapper prefixes are dropped. A file whose keys already start with ``vit.`` (a UNETR) maps one to one.
    Otherwise the file is a ViT or a ViT masked autoencoder: ``patch_embedding.*``, ``blocks.{i}.*`` and
    ``norm.*`` map to ``vit.<key>``; MONAI's ``MaskedAutoEncoderViT`` keeps its final LayerNorm as the last
    entry of ``blocks`` (``blocks.{n}.weight`` / ``.bias``, no sub-module), which maps to ``vit.norm.*``.
    Other keys (class token, decoders, loss predictor) are not mapped.

    Args:
        keys: the file's keys.

    Returns:
        ``{network key: file key}``.

    Raises:
        ValueError: two file keys map to the same network key.
    """
    names = {key: strip_wrapper_prefixes(key) for key in keys}
    unetr = any(name.startswith("vit.") for name in names.values())
    mapping: dict[str, str] = {}
    for key, name in names.items():
        if unetr:
            target = name
        elif name.startswith(("patch_embedding.", "norm.")):
            target = "vit." + name
        elif name.startswith("blocks."):
            parts = name.split(".")
            # "blocks.12.weight": a LayerNorm placed in the block list (MAE), not a transformer block
            target = "vit.norm." + parts[2] if len(parts) == 3 else "vit." + name
        else:
            continue
        if target in mapping:
            raise ValueError(f"file keys {mapping[target]!r} and {key!r} both map to {target!r}")
        mapping[target] = key
    return mapping


def vit_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict under the keys of a UNETR (:func:`vit_key_map`; timm's filter function)."""
    return filter_by_key_map(state_dict, vit_key_map)


# MONAI's UNETR is not ours to annotate: its contract is registered (weights.transfer_weights asks for it).
register_fine_tuning_contract(holds_monai_vit, FineTuningContract(VIT_INPUT_CONV_KEYS, vit_key_map))


class TransformerLossDecoder(nn.Module):
    """HPM's loss predictor for a ViT: a second MAE decoder whose head gives one value per patch.

    Args:
        hidden_size: encoder width.
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: as the reconstruction
            decoder's.
        qkv_bias: bias of the attention's qkv projection.

    Forward input: encoder tokens ``(B, 1 + V, hidden_size)`` (class token first), the visible patch
    indices ``(B, V)``, the number of patches ``L`` and the decoder's position embedding
    ``(1, L, decoder_hidden_size)``.
    Output: ``(B, L)`` predicted losses.
    """

    def __init__(
        self,
        hidden_size: int,
        decoder_hidden_size: int,
        decoder_mlp_dim: int,
        decoder_num_layers: int,
        decoder_num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)
        self.blocks = nn.Sequential(
            *(
                TransformerBlock(decoder_hidden_size, decoder_mlp_dim, decoder_num_heads, 0.0, qkv_bias)
                for _ in range(decoder_num_layers)
            ),
            nn.LayerNorm(decoder_hidden_size),
        )
        self.pred = nn.Linear(decoder_hidden_size, 1)

    def forward(
        self, latent: torch.Tensor, visible: torch.Tensor, num_patches: int, pos_embedding: torch.Tensor
    ) -> torch.Tensor:
        tokens = _decode_tokens(latent, visible, num_patches, self.embed, self.mask_token, pos_embedding)
        return self.pred(self.blocks(tokens)[:, 1:]).squeeze(-1)


def _decode_tokens(
    latent: torch.Tensor,
    visible: torch.Tensor,
    num_patches: int,
    embed: nn.Module,
    mask_token: torch.Tensor,
    pos_embedding: torch.Tensor,
) -> torch.Tensor:
    """MAE decoder input: embedded visible tokens in their places, the mask token elsewhere, positions added.

    Returns:
        ``(B, 1 + L, decoder_hidden_size)``, class token first.
    """
    h = embed(latent)
    b, _, width = h.shape
    index = visible.unsqueeze(-1).expand(-1, -1, width)
    full = mask_token.to(h.dtype).expand(b, num_patches, width).scatter(1, index, h[:, 1:])
    return torch.cat([h[:, :1], full + pos_embedding.to(h.dtype)], dim=1)


class MAEPretrainModel(MaskedAutoEncoderViT):
    """MONAI's ViT masked autoencoder with an external mask and an optional HPM loss predictor.

    A :class:`~anatomask_components.networks.contract.PretrainingNetwork`.

    The encoder sees only the visible patches (plus the class token); the decoder fills the masked places
    with the mask token and predicts every patch's voxels. Defaults: a ViT-B encoder as in MONAI's
    ``UNETR`` (hidden 768, MLP 3072, 12 layers, 12 heads, so the encoder transfers to a UNETR) on 96^3
    crops with 16^3 patches (SelfMedMAE / SelfMedHPM), MONAI's MAE decoder defaults.

    Args:
        in_channels: input channels.
        img_size: the crop; the position embeddings are fixed to it, so every input has this size.
        patch_size: the patch (mask unit).
        hidden_size, mlp_dim, num_layers, num_heads: the encoder ViT.
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: the MAE decoder.
        proj_type: patch embedding, ``"conv"`` or ``"perceptron"``.
        pos_embed_type: encoder position embedding, ``"sincos"`` (fixed, MAE) or ``"learnable"``.
        qkv_bias: bias of the attention's qkv projections (False, as UNETR's).
        loss_predictor: None (off), ``"decoder"`` (HPM: a second decoder of the same shape, see
            :class:`TransformerLossDecoder`) or ``"head"`` (a linear layer on the reconstruction decoder's
            last tokens; cheaper).

    Forward input: ``x`` ``(B, C, *img_size)`` and ``mask`` ``(B, L)`` bool (True = masked, the same number
    per sample). Output: reconstruction ``(B, C, *img_size)`` (per-patch normalised scale, the training
    target), and with ``return_loss_prediction`` also ``(B, L)`` predicted losses.
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = (96, 96, 96),
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        decoder_hidden_size: int = 384,
        decoder_mlp_dim: int = 512,
        decoder_num_layers: int = 4,
        decoder_num_heads: int = 12,
        proj_type: Literal["conv", "perceptron"] = "conv",
        pos_embed_type: Literal["sincos", "learnable"] = "sincos",
        qkv_bias: bool = False,
        loss_predictor: Literal["head", "decoder"] | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            decoder_hidden_size=decoder_hidden_size,
            decoder_mlp_dim=decoder_mlp_dim,
            decoder_num_layers=decoder_num_layers,
            decoder_num_heads=decoder_num_heads,
            proj_type=proj_type,
            pos_embed_type=pos_embed_type,
            decoder_pos_embed_type="sincos",
            qkv_bias=qkv_bias,
        )
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.loss_predictor_type = loss_predictor
        if loss_predictor is None:
            self.loss_predictor = None
        elif loss_predictor == "decoder":
            self.loss_predictor = TransformerLossDecoder(
                hidden_size,
                decoder_hidden_size,
                decoder_mlp_dim,
                decoder_num_layers,
                decoder_num_heads,
                qkv_bias,
            )
        elif loss_predictor == "head":
            self.loss_predictor = nn.Linear(decoder_hidden_size, 1)
        else:
            raise ValueError(f"unknown loss_predictor {loss_predictor!r}; choose None, 'head' or 'decoder'.")

    def num_patches(self, spatial_shape: Sequence[int]) -> int:
        """Number of patches ``L`` of a crop."""
        return math.prod(patch_grid(spatial_shape, self.patch_size))

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens ``(B, 1 + V, hidden)`` (class token first) and the visible indices ``(B, V)``."""
        if tuple(x.shape[2:]) != tuple(self.img_size):
            raise ValueError(
                f"input of spatial shape {tuple(x.shape[2:])}; this ViT's position embeddings are fixed to "
                f"{tuple(self.img_size)} (crop the input to that size)."
            )
        tokens = self.patch_embedding(x)
        b, length, width = tokens.shape
        if mask is None:
            visible = torch.arange(length, device=x.device).expand(b, -1)
        else:
            counts = (~mask).sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError(
                    f"every sample needs the same number of visible patches, got {counts.tolist()}."
                )
            # nonzero lists the visible patches of each row in raster order
            visible = (~mask).nonzero()[:, 1].reshape(b, int(counts[0]))
            tokens = tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, width))
        cls = self.cls_token.to(tokens.dtype).expand(b, -1, -1)
        return self.blocks(torch.cat([cls, tokens], dim=1)), visible

    def _decode(self, latent: torch.Tensor, visible: torch.Tensor, length: int) -> torch.Tensor:
        """The reconstruction decoder's last tokens ``(B, L, decoder_hidden)`` (class token dropped)."""
        tokens = _decode_tokens(
            latent, visible, length, self.decoder_embed, self.mask_tokens, self.decoder_pos_embedding
        )
        return self.decoder_blocks(tokens)[:, 1:]

    def _require_predictor(self) -> None:
        if self.loss_predictor is None:
            raise ValueError(
                "this model has no loss predictor; build it with loss_predictor='head' or 'decoder'."
            )

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor, return_loss_prediction: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        length = self.num_patches(x.shape[2:])
        latent, visible = self._encode(x, mask)
        decoded = self._decode(latent, visible, length)
        reconstruction = unpatchify(
            self.decoder_pred(decoded), self.patch_size, patch_grid(x.shape[2:], self.patch_size)
        )
        if not return_loss_prediction:
            return reconstruction
        self._require_predictor()
        return reconstruction, self._predict(latent, visible, decoded, length)

    def _predict(
        self, latent: torch.Tensor, visible: torch.Tensor, decoded: torch.Tensor | None, length: int
    ) -> torch.Tensor:
        if self.loss_predictor_type == "head":
            decoded = self._decode(latent, visible, length) if decoded is None else decoded
            return self.loss_predictor(decoded).squeeze(-1)
        return self.loss_predictor(latent, visible, length, self.decoder_pos_embedding)

    def predict_patch_losses(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss predictor alone, e.g. the HPM teacher on the unmasked input.

        Args:
            x: ``(B, C, *img_size)`` input.
            mask: ``(B, L)`` bool, True = masked; None: every patch is visible.

        Returns:
            ``(B, L)`` predicted reconstruction loss of every patch.
        """
        self._require_predictor()
        latent, visible = self._encode(x, mask)
        return self._predict(latent, visible, None, self.num_patches(x.shape[2:]))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder under the keys of MONAI's ``ViT(classification=False)`` (``UNETR.vit``).

        ``patch_embedding.*`` and ``blocks.{i}.*`` keep their names; the final LayerNorm, which MONAI's MAE
        keeps as the last entry of ``blocks``, becomes ``norm.*``. The class token and the decoders are not
        part of it.
        """
        final_norm = f"blocks.{self.num_layers}."
        state = {}
        for key, value in self.state_dict().items():
            if key.startswith(final_norm):
                state["norm." + key[len(final_norm) :]] = value.detach().clone()
            elif key.startswith(("patch_embedding.", "blocks.")):
                state[key] = value.detach().clone()
        return state


if TYPE_CHECKING:  # the declaration of conformance, checked by type checkers (and by tests at run time)
    _conforms: type[PretrainingNetwork] = MAEPretrainModel
