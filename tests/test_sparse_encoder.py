"""Sparse encoder of a STU-Net: masked instance norm, backend agreement, no leak (docs/method.md §4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from anatomask_components.masking import random_patch_mask
from anatomask_components.networks.sparse import SparseEncoder, masked_instance_norm, upsample_patch_mask
from anatomask_components.networks.stunet import STUNet
from anatomask_components.patches import mask_to_visible_grid

DIMS = (8, 16, 32, 64, 64)
DEPTHS = (1, 2, 1, 2, 1)  # second blocks exercise the identity shortcut


def tiny_stunet(seed: int = 0, strides=(2, 2, 2, 2)) -> STUNet:
    """5-stage STU-Net, total stride 16, with non-trivial instance-norm affine parameters."""
    torch.manual_seed(seed)
    net = STUNet(1, 2, depths=DEPTHS, dims=DIMS, strides=list(strides))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return net


def random_visible(batch: int, grid, seed: int, ratio: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = random_patch_mask(batch, grid[0] * grid[1] * grid[2], ratio, generator=gen)
    return mask_to_visible_grid(mask, grid)


def encoders(net, pooling, backends=("dense", "spconv")):
    return {b: SparseEncoder(net, 5, backend=b, norm_pooling=pooling) for b in backends}


def voxel_masks(enc: SparseEncoder, visible: torch.Tensor) -> list[torch.Tensor]:
    patch = enc.patch_size
    return [
        upsample_patch_mask(visible, [p // s for p, s in zip(patch, stride)])
        for stride in enc.cumulative_strides
    ]


def needs_spconv():
    pytest.importorskip("spconv.pytorch")


# ---------------------------------------------------------------------------------------------
# helpers


def test_upsample_patch_mask_repeats_each_patch():
    active = torch.tensor([True, False, False, True]).reshape(1, 1, 2, 2, 1)
    up = upsample_patch_mask(active, (2, 1, 3))
    assert up.shape == (1, 1, 4, 2, 3) and up.dtype == torch.bool
    for h in range(4):
        for w in range(2):
            for d in range(3):
                assert bool(up[0, 0, h, w, d]) == bool(active[0, 0, h // 2, w, d // 3])
    gen = torch.Generator().manual_seed(1)
    active = torch.rand(2, 1, 3, 2, 2, generator=gen) > 0.5
    up = upsample_patch_mask(active, (4, 4, 4))
    idx = torch.arange(12) // 4
    assert torch.equal(up, active[:, :, idx][:, :, :, idx[:8]][..., idx[:8]])


@pytest.mark.parametrize("pooling", ["sample", "batch"])
def test_masked_instance_norm_equals_instance_norm_on_visible_voxels(pooling):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 5, 4, generator=gen) * 3 + 2
    mask = torch.rand(3, 1, 6, 5, 4, generator=gen) > 0.6
    norm = nn.InstanceNorm3d(4, affine=True, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 3.0]))
    y = masked_instance_norm(x, mask, norm, pooling)

    ref = nn.InstanceNorm3d(4, affine=True, eps=1e-5)
    ref.load_state_dict(norm.state_dict())
    vis = mask[:, 0]
    expected = torch.zeros_like(x)
    groups = [[b] for b in range(3)] if pooling == "sample" else [[0, 1, 2]]
    for group in groups:
        # gather the visible voxels of the group as one (1, C, N, 1, 1) "image"
        voxels = torch.cat([x[b][:, vis[b]] for b in group], dim=1)
        normed = ref(voxels[None, :, :, None, None])[0, :, :, 0, 0]
        start = 0
        for b in group:
            n = int(vis[b].sum())
            expected[b][:, vis[b]] = normed[:, start : start + n]
            start += n
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(y.masked_select(~mask.expand_as(y)) == 0)
    # the masked values do not enter the statistics
    x2 = torch.where(mask, x, torch.randn(x.shape, generator=gen) * 100)
    assert torch.equal(masked_instance_norm(x2, mask, norm, pooling), y)


def test_masked_instance_norm_with_everything_visible_is_instance_norm():
    x = torch.randn(2, 3, 4, 4, 4)
    norm = nn.InstanceNorm3d(3, affine=True)
    torch.testing.assert_close(
        masked_instance_norm(x, torch.ones(2, 1, 4, 4, 4, dtype=torch.bool), norm, "sample"), norm(x)
    )


def _autograd_masked_instance_norm(x, mask, weight, bias, eps, pooling):
    """The textbook masked norm, differentiated by autograd: the reference of the hand-written backward."""
    dims = (0, 2, 3, 4) if pooling == "batch" else (2, 3, 4)
    m = mask.to(x.dtype)
    count = m.sum(dim=dims, keepdim=True)
    mean = (x * m).sum(dim=dims, keepdim=True) / count
    centred = (x - mean) * m
    var = centred.square().sum(dim=dims, keepdim=True) / count
    y = centred / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)
    return y * m


@pytest.mark.parametrize("pooling", ["sample", "batch"])
@pytest.mark.parametrize("affine", [True, False])
def test_masked_instance_norm_backward_equals_autograd(pooling, affine):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 5, 4, 6, generator=gen, dtype=torch.float64) * 2 + 4).requires_grad_()
    mask = torch.rand(2, 1, 5, 4, 6, generator=gen) > 0.4
    norm = nn.InstanceNorm3d(3, affine=affine, eps=1e-5).double()
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([0.5, -1.5, 2.0]))
            norm.bias.copy_(torch.tensor([0.3, 0.0, -1.0]))
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (masked_instance_norm(x, mask, norm, pooling) * upstream).sum().backward()
    grads = [x.grad.clone()] + ([norm.weight.grad.clone(), norm.bias.grad.clone()] if affine else [])

    x2 = x.detach().clone().requires_grad_()
    weight = (norm.weight if affine else torch.ones(3, dtype=torch.float64)).detach().clone().requires_grad_()
    bias = (norm.bias if affine else torch.zeros(3, dtype=torch.float64)).detach().clone().requires_grad_()
    (_autograd_masked_instance_norm(x2, mask, weight, bias, 1e-5, pooling) * upstream).sum().backward()
    expected = [x2.grad] + ([weight.grad, bias.grad] if affine else [])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.all(x.grad[~mask.expand_as(x)] == 0)  # nothing flows to masked voxels


def test_masked_instance_norm_reduced_precision_keeps_fp32_statistics():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, 8, generator=gen) * 3 + 100  # large offset: bf16 statistics would drift
    mask = torch.rand(1, 1, 8, 8, 8, generator=gen) > 0.5
    norm = nn.InstanceNorm3d(4, affine=True)
    y = masked_instance_norm(x.bfloat16(), mask, norm, "batch")
    assert y.dtype == torch.bfloat16
    expected = masked_instance_norm(x.bfloat16().float(), mask, norm, "batch")
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# the encoder


@pytest.mark.parametrize("pooling", ["sample", "batch"])
def test_all_visible_equals_the_dense_stunet_encoder(pooling):
    net = tiny_stunet()
    enc = SparseEncoder(net, 5, backend="dense", norm_pooling=pooling)
    batch = 2 if pooling == "sample" else 1  # batch pooling equals instance norm only for one sample
    x = torch.randn(batch, 1, 32, 32, 48)
    feats = enc(x, torch.ones(batch, 1, 2, 2, 3, dtype=torch.bool))
    h = x
    for stage, f in zip(net.conv_blocks_context, feats):
        h = stage(h)
        torch.testing.assert_close(f, h, rtol=1e-4, atol=1e-5)


def test_encoder_geometry_and_validation():
    net = tiny_stunet()
    enc = SparseEncoder(net, 5)
    assert enc.patch_size == (16, 16, 16)
    assert enc.cumulative_strides == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    assert enc.widths == list(DIMS)
    # the encoder runs the STU-Net's own modules under the official names
    assert enc.sp_cnn.conv_blocks_context[3] is net.conv_blocks_context[3]
    assert set(enc.state_dict()) == {
        "sp_cnn." + k for k in net.state_dict() if k.startswith("conv_blocks_context.")
    }
    feats = enc(torch.randn(1, 1, 32, 32, 48), torch.ones(1, 1, 2, 2, 3, dtype=torch.bool))
    assert [tuple(f.shape) for f in feats] == [
        (1, 8, 32, 32, 48),
        (1, 16, 16, 16, 24),
        (1, 32, 8, 8, 12),
        (1, 64, 4, 4, 6),
        (1, 64, 2, 2, 3),
    ]
    with pytest.raises(ValueError):
        enc(torch.randn(1, 1, 32, 32, 48), torch.ones(1, 1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        enc(torch.randn(1, 1, 32, 32, 40), torch.ones(1, 1, 2, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        SparseEncoder(net, 5, backend="torchsparse")
    with pytest.raises(ValueError):
        SparseEncoder(net, 5, norm_pooling="channel")
    with pytest.raises(ValueError):
        SparseEncoder(net, 6)


@pytest.mark.parametrize("backend", ["dense", "spconv"])
def test_mask_is_an_argument_not_state(backend):
    if backend == "spconv":
        needs_spconv()
    enc = SparseEncoder(tiny_stunet(), 5, backend=backend)
    x = torch.randn(2, 1, 32, 32, 48)
    vis_a, vis_b = random_visible(2, (2, 2, 3), 1), random_visible(2, (2, 2, 3), 2)
    first = enc(x, vis_a)
    enc(x, vis_b)
    again = enc(x, vis_a)
    for f, g in zip(first, again):
        assert torch.equal(f, g)


@pytest.mark.parametrize("backend", ["dense", "spconv"])
@pytest.mark.parametrize("pooling", ["sample", "batch"])
def test_masked_input_voxels_do_not_leak_into_the_features(backend, pooling):
    if backend == "spconv":
        needs_spconv()
    enc = SparseEncoder(tiny_stunet(), 5, backend=backend, norm_pooling=pooling)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 32, 32, 48, generator=gen)
    visible = random_visible(2, (2, 2, 3), 4)
    vox = upsample_patch_mask(visible, (16, 16, 16))
    x2 = torch.where(vox, x, 1e3 * torch.randn(x.shape, generator=gen))
    f1, f2 = enc(x, visible), enc(x2, visible)
    for a, b in zip(f1, f2):
        assert torch.equal(a, b)
    # changing a visible voxel does change them (the comparison above is not vacuous)
    x3 = torch.where(vox, x + 1.0, x)
    assert not torch.equal(enc(x3, visible)[-1], f1[-1])
    # and no gradient reaches a masked voxel
    xg = x.clone().requires_grad_(True)
    sum((f * torch.randn(f.shape, generator=gen)).sum() for f in enc(xg, visible)).backward()
    assert torch.all(xg.grad.masked_select(~vox) == 0)
    assert xg.grad.masked_select(vox).abs().sum() > 0


@pytest.mark.parametrize("pooling", ["sample", "batch"])
def test_norm_pooling_across_samples(pooling):
    """Per-sample statistics keep samples independent; batch pooling (reference) couples them."""
    enc = SparseEncoder(tiny_stunet(), 5, backend="dense", norm_pooling=pooling)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 32, 32, 48, generator=gen)
    visible = random_visible(2, (2, 2, 3), 6)
    x2 = x.clone()
    x2[0] = 3 * x2[0] + 1  # change sample 0's visible voxels
    f1, f2 = enc(x, visible), enc(x2, visible)
    same = all(torch.equal(a[1], b[1]) for a, b in zip(f1, f2))
    assert same == (pooling == "sample")


def _backend_features(pooling, shape, seed):
    net = tiny_stunet(seed)
    encs = encoders(net, pooling)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    grid = tuple(s // 16 for s in shape[2:])
    visible = random_visible(shape[0], grid, seed + 100)
    return net, encs, x, visible


@pytest.mark.parametrize("pooling", ["sample", "batch"])
@pytest.mark.parametrize(
    "shape,seed",
    [
        ((2, 1, 32, 32, 48), 0),
        ((3, 1, 32, 48, 32), 1),
        pytest.param((2, 1, 64, 64, 64), 2, marks=pytest.mark.slow),
    ],
)
def test_backends_agree_on_visible_voxels_and_zero_masked_ones(pooling, shape, seed):
    needs_spconv()
    _, encs, x, visible = _backend_features(pooling, shape, seed)
    with torch.no_grad():
        dense = encs["dense"](x, visible)
        sparse = encs["spconv"](x, visible)
    for f_d, f_s, vox in zip(dense, sparse, voxel_masks(encs["dense"], visible)):
        assert f_d.shape == f_s.shape
        masked = ~vox.expand_as(f_d)
        assert torch.all(f_d[masked] == 0) and torch.all(f_s[masked] == 0)
        assert (f_d - f_s).abs().max() < 1e-4
        assert f_d[~masked].abs().max() > 0.1  # features are not trivially zero


@pytest.mark.parametrize("pooling", ["sample", "batch"])
def test_backends_agree_on_gradients(pooling):
    needs_spconv()
    net, encs, x, visible = _backend_features(pooling, (2, 1, 32, 32, 48), 7)
    gen = torch.Generator().manual_seed(8)
    weights = None
    grads = {}
    for name, enc in encs.items():  # both encoders share the same STU-Net modules
        net.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        feats = enc(xg, visible)
        if weights is None:
            weights = [torch.randn(f.shape, generator=gen) for f in feats]
        sum((f * w).sum() for f, w in zip(feats, weights)).backward()
        grads[name] = {"input": xg.grad} | {
            k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None
        }
    assert grads["dense"].keys() == grads["spconv"].keys()
    assert len(grads["dense"]) == 1 + len(list(encs["dense"].parameters()))
    for k, g_d in grads["dense"].items():
        g_s = grads["spconv"][k]
        if k.endswith(("conv1.bias", "conv2.bias")):
            # a bias right before an instance norm cancels out: its exact gradient is zero, so both
            # backends only show rounding noise, far below the gradient of the conv weight
            w = grads["dense"][k.replace(".bias", ".weight")].abs().max()
            assert g_d.abs().max() < 1e-5 * w and g_s.abs().max() < 1e-5 * w, k
        else:
            # relative L2 error: a feature within rounding of LeakyReLU's kink may take the other slope
            # in one backend, which moves the gradient of a few voxels, not of the whole tensor
            assert (g_d - g_s).norm() < 1e-3 * g_d.norm(), k
            assert g_d.abs().max() > 1e-3, k


def test_backends_agree_with_anisotropic_strides():
    needs_spconv()
    net = tiny_stunet(strides=((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)))
    encs = encoders(net, "batch")
    assert encs["dense"].patch_size == (16, 16, 8)
    x = torch.randn(2, 1, 32, 32, 24)
    visible = random_visible(2, (2, 2, 3), 9)
    with torch.no_grad():
        for f_d, f_s in zip(encs["dense"](x, visible), encs["spconv"](x, visible)):
            assert (f_d - f_s).abs().max() < 1e-4


def test_masked_instance_norm_bf16_saves_bf16_and_equals_fp32_arithmetic():
    """Under bf16 the norm keeps its one feature-sized tensor in bf16 (half the memory of an fp32 copy)
    and computes exactly what the fp32 norm computes on the same (upcast) values."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 4, 6, 6, 6, generator=gen) * 3 + 10).bfloat16().requires_grad_()
    mask = torch.rand(2, 1, 6, 6, 6, generator=gen) > 0.5
    norm = nn.InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -1.5, 2.0, 1.0]))
    upstream = torch.randn(x.shape, generator=gen).bfloat16()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = masked_instance_norm(x, mask, norm, "batch")
    (y * upstream).sum().backward()
    feature_sized = [t for t in saved if t.shape == x.shape]
    assert feature_sized and all(t.dtype == torch.bfloat16 for t in feature_sized)

    x32 = x.detach().float().requires_grad_()
    y32 = masked_instance_norm(x32, mask, norm, "batch")
    (y32 * upstream.float()).sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert torch.equal(y, y32.bfloat16())
    assert torch.equal(x.grad, x32.grad.bfloat16())


def test_dense_backend_keeps_autocast_dtype():
    """Under bf16 autocast every feature map stays bf16: an fp32 mask multiplied into a convolution's
    bf16 output must not promote the stage outputs (and every later convolution's input) to fp32."""
    enc = encoders(tiny_stunet(), "batch", backends=("dense",))["dense"]
    visible = random_visible(1, (2, 2, 3), seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = enc(torch.randn(1, 1, 32, 32, 48), visible)
    assert [f.dtype for f in feats] == [torch.bfloat16] * len(feats)
