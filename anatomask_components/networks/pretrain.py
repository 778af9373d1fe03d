"""AnatoMask / SparK pretraining network: sparse encoder of a CNN, densify step, reconstruction decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn

from anatomask_components.networks.contract import PretrainingBackbone, PretrainingNetwork
from anatomask_components.networks.decoders import LightDecoder, PatchLossHead, SimpleDecoder
from anatomask_components.networks.sparse import Backend, NormPooling, SparseEncoder, masked_instance_norm
from anatomask_components.patches import mask_to_visible_grid, patch_grid, patchify

__all__ = ["AnatoMaskPretrainModel"]

ENCODER_PREFIX = "sparse_encoder.sp_cnn."


class AnatoMaskPretrainModel(nn.Module):
    """Sparse encoder of a CNN backbone with SparK's densify step and a reconstruction decoder.

    A :class:`~anatomask_components.networks.contract.PretrainingNetwork`. The backbone is any dense CNN
    that declares its encoder (:class:`~anatomask_components.networks.contract.PretrainingBackbone`), as
    SparK's encoder wraps any CNN: a STU-Net in the bundles, ``STUNet(in_channels, 1, size="B")``.

    Args:
        backbone: the dense network whose encoder stages are pretrained; only those stages are kept
            (under ``sparse_encoder.sp_cnn.`` with the backbone's own names). The input channels are its.
        num_stages: encoder stages to pretrain, the first ones of the backbone: for STU-Net 5 (reference,
            total stride 16) or all 6.
        decoder: ``"hierarchical"`` (SparK's LightDecoder fed by 4 densified levels) or ``"simple"``
            (two conv blocks on the deepest features, paper Table 1).
        backend: sparse encoder backend, ``"auto"`` (per call, the faster for the device, the pass and the
            masked fraction: :data:`~anatomask_components.networks.sparse.SPCONV_FROM_MASKED_FRACTION`),
            ``"dense"`` (masked dense convolutions) or ``"spconv"``.
        norm_pooling: sparse instance-norm statistics over the batch (reference) or per ``"sample"``.
        hierarchy: number of densified levels fed to the hierarchical decoder.
        encoder_init: ``"pytorch"`` re-initialises the convolutions of the backbone's encoder stages with
            PyTorch's default (reference pretraining), ``"he"`` keeps the backbone's own initialisation
            (STU-Net: nnU-Net's He initialisation, what a fine-tuning STU-Net gets).
        densify_init: the densify projections: ``"pytorch"`` default (reference) or ``"trunc_normal"``
            (std 0.02, zero bias, as SparK's decoder).
        densify_norm_eps: epsilon of the densify normalisation (reference 1e-6; PyTorch's default 1e-5).
        loss_predictor: HPM's loss predictor (docs/method.md §12.1), off (None) by default: ``"head"``, a
            light conv head on the deepest densified level (:class:`PatchLossHead`), or ``"decoder"``, a
            second decoder of the reconstruction decoder's shape with one output channel, averaged over
            each patch (HPM's design).

    Forward input: ``x`` ``(B, C, H, W, D)`` and ``mask`` ``(B, L)`` bool (True = masked) over the
    ``patch_size`` grid in raster order; ``mask=None`` masks nothing: a plain reconstruction of the whole
    input (what ``network_def(x)`` gives, e.g. in MONAI's ``verify_net_in_out``). Output: reconstruction
    ``(B, C, H, W, D)``, and with ``return_loss_prediction`` also the predicted loss of every patch
    ``(B, L)``.
    """

    def __init__(
        self,
        backbone: PretrainingBackbone,
        num_stages: int = 5,
        decoder: Literal["hierarchical", "simple"] = "hierarchical",
        backend: Backend = "auto",
        norm_pooling: NormPooling = "batch",
        hierarchy: int = 4,
        encoder_init: Literal["pytorch", "he"] = "pytorch",
        densify_init: Literal["pytorch", "trunc_normal"] = "pytorch",
        densify_norm_eps: float = 1e-6,
        loss_predictor: Literal["head", "decoder"] | None = None,
    ) -> None:
        super().__init__()
        if encoder_init not in ("pytorch", "he"):
            raise ValueError(f"encoder_init must be 'pytorch' or 'he', got {encoder_init!r}.")
        if densify_init not in ("pytorch", "trunc_normal"):
            raise ValueError(f"densify_init must be 'pytorch' or 'trunc_normal', got {densify_init!r}.")
        if encoder_init == "pytorch":
            # STUNet applies He at construction (right for fine-tuning); the reference pretrains from
            # PyTorch's default initialisation. Every stage, pretrained or not: a seed's random draws then
            # do not depend on num_stages.
            for m in backbone.encoder_stages.modules():
                if isinstance(m, nn.Conv3d):
                    m.reset_parameters()
        in_channels = self.in_channels = backbone.in_channels
        self.norm_pooling = norm_pooling
        self.sparse_encoder = SparseEncoder(backbone, num_stages, backend, norm_pooling)
        cumulative = self.sparse_encoder.cumulative_strides
        widths = self.sparse_encoder.widths
        patch = self.patch_size
        # the deepest stage of each distinct resolution, coarsest first
        by_resolution = {stride: i for i, stride in enumerate(cumulative)}
        levels = sorted(by_resolution.values(), key=lambda i: -math.prod(cumulative[i]))
        if decoder == "hierarchical":
            if len(set(patch)) != 1:
                raise ValueError(f"the hierarchical decoder needs an isotropic mask unit, got {patch}.")
            self.dense_decoder = LightDecoder(widths[levels[0]], patch[0], in_channels)
            levels = levels[: min(hierarchy, len(self.dense_decoder.dec))]
            for i, stage in enumerate(levels):
                if cumulative[stage] != tuple(p // 2**i for p in patch):
                    raise ValueError(
                        f"stage {stage} has stride {cumulative[stage]}; level {i} of the hierarchical "
                        f"decoder needs {tuple(p // 2**i for p in patch)}."
                    )
        elif decoder == "simple":
            self.dense_decoder = SimpleDecoder(widths[levels[0]], patch, in_channels)
            levels = levels[:1]
        else:
            raise ValueError(f"unknown decoder {decoder!r}; choose 'hierarchical' or 'simple'.")
        self.decoder_type = decoder
        self.level_stages = levels
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        for i, (stage, d_width) in enumerate(zip(levels, self.dense_decoder.level_widths)):
            e_width = widths[stage]
            token = nn.Parameter(torch.zeros(1, e_width, 1, 1, 1))
            nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(nn.InstanceNorm3d(e_width, eps=densify_norm_eps, affine=True))
            if i == 0 and e_width == d_width:
                proj = nn.Identity()
            else:
                k = 1 if i == 0 else 3
                proj = nn.Conv3d(e_width, d_width, kernel_size=k, padding=k // 2)
                if densify_init == "trunc_normal":
                    nn.init.trunc_normal_(proj.weight, std=0.02)
                    nn.init.zeros_(proj.bias)
            self.densify_projs.append(proj)
        self.loss_predictor_type = loss_predictor
        width = self.dense_decoder.level_widths[0]
        if loss_predictor is None:
            self.loss_predictor = None
        elif loss_predictor == "head":
            self.loss_predictor = PatchLossHead(width)
        elif loss_predictor == "decoder":
            self.loss_predictor = (
                LightDecoder(width, patch[0], 1)
                if decoder == "hierarchical"
                else SimpleDecoder(width, patch, 1)
            )
        else:
            raise ValueError(f"unknown loss_predictor {loss_predictor!r}; choose None, 'head' or 'decoder'.")

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Mask unit (the encoder's total stride)."""
        return self.sparse_encoder.patch_size

    def num_patches(self, spatial_shape: Sequence[int]) -> int:
        """Number of mask units ``L`` of a crop."""
        return math.prod(patch_grid(spatial_shape, self.patch_size))

    def densify(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Sparse encoding and densification: the decoder's inputs.

        Args:
            x: ``(B, C, H, W, D)`` input.
            mask: ``(B, L)`` bool, True = masked.

        Returns:
            one tensor per decoder level, coarsest first: normalised features at visible positions, the
            level's mask token elsewhere, projected to the decoder width of that level.
        """
        grid = patch_grid(x.shape[2:], self.patch_size)
        visible = mask_to_visible_grid(mask, grid)
        masks = self.sparse_encoder.visible_masks(visible)
        features = self.sparse_encoder(x, visible, masks)
        cumulative = self.sparse_encoder.cumulative_strides
        to_dec = []
        for stage, norm, token, proj in zip(
            self.level_stages, self.densify_norms, self.mask_tokens, self.densify_projs
        ):
            vis = masks[cumulative[stage]]
            feat = masked_instance_norm(features[stage], vis, norm, self.norm_pooling)
            to_dec.append(proj(torch.where(vis, feat, token.to(feat.dtype))))
        return to_dec

    def _predict_losses(self, to_dec: list[torch.Tensor]) -> torch.Tensor:
        if self.loss_predictor_type == "head":
            return self.loss_predictor(to_dec[0])
        return patchify(self.loss_predictor(to_dec), self.patch_size).mean(dim=-1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_loss_prediction: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.zeros(x.shape[0], self.num_patches(x.shape[2:]), dtype=torch.bool, device=x.device)
        to_dec = self.densify(x, mask)
        reconstruction = self.dense_decoder(to_dec)
        if not return_loss_prediction:
            return reconstruction
        if self.loss_predictor is None:
            raise ValueError(
                "this model has no loss predictor; build it with loss_predictor='head' or 'decoder'."
            )
        return reconstruction, self._predict_losses(to_dec)

    def predict_patch_losses(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss predictor alone (no reconstruction), e.g. the HPM teacher on the unmasked input.

        Args:
            x: ``(B, C, H, W, D)`` input.
            mask: ``(B, L)`` bool, True = masked; None: nothing masked.

        Returns:
            ``(B, L)`` predicted reconstruction loss of every patch.
        """
        if self.loss_predictor is None:
            raise ValueError(
                "this model has no loss predictor; build it with loss_predictor='head' or 'decoder'."
            )
        if mask is None:
            mask = torch.zeros(x.shape[0], self.num_patches(x.shape[2:]), dtype=torch.bool, device=x.device)
        return self._predict_losses(self.densify(x, mask))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The pretrained encoder under the backbone's keys (STU-Net: ``conv_blocks_context.*``)."""
        return {k: v.detach().clone() for k, v in self.sparse_encoder.sp_cnn.state_dict().items()}


if TYPE_CHECKING:  # the declaration of conformance, checked by type checkers (and by tests at run time)
    _conforms: type[PretrainingNetwork] = AnatoMaskPretrainModel
