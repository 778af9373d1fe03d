"""The pretraining takes any CNN backbone whose blocks have a sparse rule, not only STU-Net (issue 18, 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from anatomask_components.masking import random_patch_mask
from anatomask_components.networks import (
    AnatoMaskPretrainModel,
    PretrainingBackbone,
    SparseEncoder,
    STUNet,
    register_sparse_rule,
)
from anatomask_components.networks.sparse import SparseContext, upsample_patch_mask
from anatomask_components.patches import mask_to_visible_grid, patch_grid

WIDTHS = (8, 16, 16)
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2))  # mask unit 4^3
SHAPE = (2, 1, 16, 16, 12)  # 4 x 4 x 3 patches


def conv_norm_act(in_channels: int, out_channels: int, stride: tuple[int, int, int]) -> list[nn.Module]:
    return [
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),  # in place in the dense network; the sparse rule must not be
    ]


class PlainCNN(nn.Module):
    """A CNN of plain conv-norm-LeakyReLU stages, no STU-Net: a stage's first convolution is strided.

    Input: ``(B, in_channels, H, W, D)``. Output: the deepest features ``(B, 16, H / 4, W / 4, D / 4)``.
    """

    def __init__(self, in_channels: int = 1, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        stages, c = [], in_channels
        for width, stride in zip(WIDTHS, STRIDES):
            stages.append(
                nn.Sequential(*conv_norm_act(c, width, stride), *conv_norm_act(width, width, (1, 1, 1)))
            )
            c = width
        if extra is not None:
            stages[1].append(extra)
        self.features = nn.ModuleList(stages)
        self.encoder_strides = list(STRIDES)
        self.encoder_widths = list(WIDTHS)

    @property
    def encoder_stages(self) -> nn.ModuleList:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.features:
            x = stage(x)
        return x


def plain_cnn(seed: int = 0, extra: nn.Module | None = None) -> PlainCNN:
    """A seeded :class:`PlainCNN` with non-trivial instance-norm affine parameters."""
    torch.manual_seed(seed)
    net = PlainCNN(extra=extra)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return net


def random_mask(length: int, seed: int) -> torch.Tensor:
    return random_patch_mask(SHAPE[0], length, 0.6, generator=torch.Generator().manual_seed(seed))


def needs(backend: str) -> None:
    if backend == "spconv":
        pytest.importorskip("spconv.pytorch")


def test_stunet_and_a_plain_cnn_declare_the_backbone_protocol():
    stunet = STUNet(1, 1, size="tiny")
    assert isinstance(stunet, PretrainingBackbone) and isinstance(PlainCNN(), PretrainingBackbone)
    assert stunet.encoder_stages is stunet.conv_blocks_context
    assert stunet.encoder_strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert stunet.encoder_widths == [8, 16, 32, 64, 64]


@pytest.mark.parametrize("backend", ["dense", "spconv"])
def test_a_plain_cnn_pretrains_through_the_anatomask_model(backend):
    needs(backend)
    backbone = plain_cnn()
    model = AnatoMaskPretrainModel(backbone, num_stages=3, backend=backend)
    assert model.patch_size == (4, 4, 4) and model.in_channels == 1
    # the encoder keeps the backbone's own names: the exported encoder loads into the dense network
    assert all(
        k.startswith(("sparse_encoder.sp_cnn.features.", "dense_decoder.", "densify_", "mask_tokens."))
        for k in model.state_dict()
    )
    PlainCNN().load_state_dict(model.encoder_state_dict(), strict=True)
    assert model.sparse_encoder.stages[2] is backbone.features[2]

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen)
    mask = random_mask(model.num_patches(SHAPE[2:]), 2)
    masked = upsample_patch_mask(  # True on the voxels of masked patches
        mask_to_visible_grid(~mask, patch_grid(SHAPE[2:], model.patch_size)), (4, 4, 4)
    )
    with torch.no_grad():  # masked voxels do not leak into the reconstruction
        noisy = torch.where(masked, 1e3 * torch.randn(SHAPE, generator=gen), x)
        assert torch.equal(model(x, mask), model(noisy, mask))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = (model(x, mask) - x).square()[masked.expand_as(x)].mean()
        loss.backward()
        assert all(p.grad is not None for p in backbone.features.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("pooling", ["sample", "batch"])
def test_plain_cnn_sparse_features_equal_the_masked_dense_ones(pooling):
    needs("spconv")
    backbone = plain_cnn(3)
    dense, sparse = (SparseEncoder(backbone, backend=b, norm_pooling=pooling) for b in ("dense", "spconv"))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=gen)
    visible = mask_to_visible_grid(~random_mask(48, 5), (4, 4, 3))
    with torch.no_grad():
        for f_d, f_s, stride in zip(dense(x, visible), sparse(x, visible), dense.cumulative_strides):
            vox = upsample_patch_mask(visible, [4 // s for s in stride]).expand_as(f_d)
            assert torch.all(f_d[~vox] == 0) and torch.all(f_s[~vox] == 0)
            assert (f_d - f_s).abs().max() < 1e-4 and f_d[vox].abs().max() > 0.1


def test_all_visible_sparse_features_are_the_dense_network_features():
    backbone = plain_cnn(6)
    encoder = SparseEncoder(backbone, backend="dense", norm_pooling="sample")
    x = torch.randn(SHAPE)
    h = x
    for stage, features in zip(backbone.features, encoder(x, torch.ones(2, 1, 4, 4, 3, dtype=torch.bool))):
        h = stage(h)
        torch.testing.assert_close(features, h, rtol=1e-4, atol=1e-5)


class ScaledResidualConv(nn.Module):
    """``x + scale * conv(x)``: a block the sparse encoder has no rule for until one is registered."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.conv(x)


def _sparse_scaled_residual_conv(context: SparseContext, block: ScaledResidualConv, h, stride):
    y, out_stride = context.conv(block.conv, h, stride)
    return h + block.scale * y, out_stride


def test_a_block_without_a_sparse_rule_is_named_with_how_to_register_one():
    backbone = plain_cnn(extra=ScaledResidualConv(WIDTHS[1]))
    with pytest.raises(TypeError) as error:
        AnatoMaskPretrainModel(backbone, num_stages=3)
    message = str(error.value)
    assert message.startswith("features.1.6: ")  # where it is in the backbone
    assert "ScaledResidualConv" in message and "register_sparse_rule(ScaledResidualConv, rule)" in message

    register_sparse_rule(ScaledResidualConv, _sparse_scaled_residual_conv)
    encoder = SparseEncoder(backbone, backend="dense", norm_pooling="sample")
    x = torch.randn(SHAPE)
    features = encoder(x, torch.ones(2, 1, 4, 4, 3, dtype=torch.bool))
    torch.testing.assert_close(features[-1], backbone(x), rtol=1e-4, atol=1e-5)


def test_declared_strides_are_checked_against_the_stages():
    backbone = plain_cnn()
    backbone.encoder_strides = [(1, 1, 1), (2, 2, 2), (4, 4, 4)]  # the last stage only halves
    encoder = SparseEncoder(backbone)
    assert encoder.patch_size == (8, 8, 8)
    with pytest.raises(
        ValueError, match=r"stage 2 ends at stride \(4, 4, 4\); the backbone declares \(8, 8, 8\)"
    ):
        encoder(torch.randn(1, 1, 8, 8, 8), torch.ones(1, 1, 1, 1, 1, dtype=torch.bool))
