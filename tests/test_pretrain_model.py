"""AnatoMask pretraining network: sizes, keys, decoders and the absence of leaks (docs/method.md §3-§5)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from anatomask_components.masking import random_patch_mask
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.networks.decoders import LightDecoder, SimpleDecoder
from anatomask_components.networks.stunet import count_parameters
from anatomask_components.patches import patchify

TINY = {"depths": (1, 2, 1, 1, 1, 1), "dims": (8, 16, 32, 64, 64, 64)}


def tiny_model(seed=0, in_channels=1, strides=None, **options) -> AnatoMaskPretrainModel:
    torch.manual_seed(seed)
    return AnatoMaskPretrainModel(STUNet(in_channels, 1, **TINY, strides=strides), **options)


def random_mask(batch, length, seed, ratio=0.6):
    return random_patch_mask(batch, length, ratio, generator=torch.Generator().manual_seed(seed))


def needs(backend):
    if backend == "spconv":
        pytest.importorskip("spconv.pytorch")


def voxel_mask(mask, grid, patch=(16, 16, 16)):
    """(B, L) True = masked -> (B, 1, H, W, D) True = masked voxel."""
    m = mask.reshape(mask.shape[0], 1, *grid)
    for axis, p in enumerate(patch):
        m = m.repeat_interleave(p, dim=2 + axis)
    return m


# ---------------------------------------------------------------------------------------------
# STU-Net-B sizes and keys (meta device)


def _official_encoder_keys(stages=5):
    keys = set()
    for s in range(stages):
        for mod in ("conv1", "conv2", "conv3", "norm1", "norm2"):
            keys |= {f"conv_blocks_context.{s}.0.{mod}.weight", f"conv_blocks_context.{s}.0.{mod}.bias"}
    return keys


def test_stunet_b_pretraining_model_size():
    with torch.device("meta"):
        model = AnatoMaskPretrainModel(STUNet(1, 1, size="B"))
    assert count_parameters(model) == pytest.approx(53.05e6, rel=0.005)
    assert count_parameters(model.sparse_encoder) / 1e6 == pytest.approx(14.31, abs=0.005)
    assert count_parameters(model.dense_decoder) / 1e6 == pytest.approx(36.39, abs=0.005)
    # densify, by hand: 3^3 projections at the three finer levels (identity at the deepest, 512 = 512),
    # one affine norm and one mask token per level
    enc, dec = (512, 256, 128, 64), (512, 256, 128, 64)
    densify = sum(dec[i] * enc[i] * 27 + dec[i] for i in (1, 2, 3)) + sum(3 * e for e in enc)
    assert (
        count_parameters(model)
        - count_parameters(model.sparse_encoder)
        - count_parameters(model.dense_decoder)
        == densify
    )
    # the reference's 2.35 M also counts a full-resolution level (width 32) that it never uses
    unused = 32 * 32 * 27 + 32 + 3 * 32
    assert (densify + unused) / 1e6 == pytest.approx(2.35, abs=0.005)
    assert model.level_stages == [4, 3, 2, 1]


def test_stunet_b_encoder_keys_follow_the_official_layout():
    with torch.device("meta"):
        model = AnatoMaskPretrainModel(STUNet(1, 1, size="B"))
        finetune = STUNet(1, 105, size="B")
    official = _official_encoder_keys(5)
    assert len(official) == 50
    assert set(model.encoder_state_dict()) == official
    # the reference fine-tuning loader: keys of a DDP-saved SSL checkpoint that contain "encoder",
    # stripped up to "sp_cnn.", load 50 of the 130 STU-Net-B tensors
    ssl = {"module." + k: v for k, v in model.state_dict().items()}
    loaded = {k.split("sp_cnn.", 1)[1]: v for k, v in ssl.items() if "encoder" in k}
    assert set(loaded) == official
    result = finetune.load_state_dict(loaded, strict=False, assign=True)
    assert result.unexpected_keys == []
    assert len(result.missing_keys) == 130 - 50
    assert not any(
        k.startswith("conv_blocks_context.") and int(k.split(".")[1]) < 5 for k in result.missing_keys
    )


def test_encoder_weights_transfer_to_a_segmentation_stunet():
    model = tiny_model()
    state = model.encoder_state_dict()
    net = STUNet(1, 3, **TINY)
    result = net.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    own = model.sparse_encoder.sp_cnn.conv_blocks_context
    for s in range(5):
        for a, b in zip(own[s].parameters(), net.conv_blocks_context[s].parameters()):
            assert torch.equal(a, b)
    # a copy, not a view of the live weights
    state["conv_blocks_context.0.0.conv1.weight"].zero_()
    assert own[0][0].conv1.weight.abs().sum() > 0
    # the pretraining model holds only the pretrained part of the STU-Net
    keys = model.state_dict().keys()
    assert not any(k.startswith(("seg_outputs", "upsample_layers", "conv_blocks_localization")) for k in keys)
    assert not any("conv_blocks_context.5." in k for k in keys)


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("decoder", ["hierarchical", "simple"])
def test_reconstruction_shape_and_levels(decoder):
    model = tiny_model(decoder=decoder, in_channels=2)
    assert model.patch_size == (16, 16, 16)
    assert model.num_patches((32, 32, 48)) == 12
    assert model.level_stages == ([4, 3, 2, 1] if decoder == "hierarchical" else [4])
    x = torch.randn(2, 2, 32, 32, 48)
    out = model(x, random_mask(2, 12, 0))
    assert out.shape == x.shape
    six = tiny_model(decoder=decoder, num_stages=6)
    # the bottleneck keeps the 1/16 resolution and becomes the deepest level
    assert six.level_stages[0] == 5
    assert six(torch.randn(1, 1, 32, 32, 32), random_mask(1, 8, 1)).shape == (1, 1, 32, 32, 32)


def test_invalid_configurations():
    with pytest.raises(ValueError):
        tiny_model(decoder="transformer")
    with pytest.raises(ValueError):  # anisotropic mask unit
        tiny_model(strides=[(2, 2, 1), 2, 2, 2, 1])


@pytest.mark.parametrize("backend", ["dense", "spconv"])
@pytest.mark.parametrize("decoder", ["hierarchical", "simple"])
@pytest.mark.parametrize("pooling", ["batch", "sample"])
def test_masked_voxels_do_not_leak_into_the_reconstruction(backend, decoder, pooling):
    needs(backend)
    model = tiny_model(decoder=decoder, backend=backend, norm_pooling=pooling)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, 48, generator=gen)
    mask = random_mask(2, 12, 2)
    masked_vox = voxel_mask(mask, (2, 2, 3))
    x2 = torch.where(masked_vox, 1e3 * torch.randn(x.shape, generator=gen), x)
    with torch.no_grad():
        for train in (False, True):  # train: BatchNorm uses this batch's statistics, same batch twice
            model.train(train)
            out, out2 = model(x, mask), model(x2, mask)
            assert torch.equal(out, out2)
        # changing a visible voxel does change the reconstruction, masked patches included
        model.eval()
        out3 = model(torch.where(masked_vox, x, x + 1.0), mask)
        assert not torch.equal(out3[masked_vox.expand_as(out3)], out[masked_vox.expand_as(out)])


@pytest.mark.parametrize("decoder", ["hierarchical", "simple"])
def test_backends_agree_on_the_reconstruction(decoder):
    needs("spconv")
    model = tiny_model(decoder=decoder).eval()
    x = torch.randn(2, 1, 32, 32, 48)
    mask = random_mask(2, 12, 3)
    with torch.no_grad():
        dense = model(x, mask)
        model.sparse_encoder.backend = "spconv"
        sparse = model(x, mask)
    assert model.sparse_encoder.backend == "spconv"
    assert (dense - sparse).abs().max() < 1e-4 * dense.abs().max()


@pytest.mark.parametrize("pooling", ["batch", "sample"])
def test_densify_normalises_over_visible_voxels_and_fills_mask_tokens(pooling):
    model = tiny_model(norm_pooling=pooling).eval()
    with torch.no_grad():
        for norm in model.densify_norms:
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_(0.0, 1.0)
    inputs, features = {}, []
    model.sparse_encoder.register_forward_hook(lambda m, args, out: features.extend(out))
    for i, proj in enumerate(model.densify_projs):
        proj.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
    mask = random_mask(2, 12, 6)
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32, 48), mask)
    assert sorted(inputs) == [0, 1, 2, 3]
    for i, stage in enumerate(model.level_stages):
        z, norm, token = inputs[i], model.densify_norms[i], model.mask_tokens[i]
        factor = 16 // model.sparse_encoder.cumulative_strides[stage][0]
        masked = voxel_mask(mask, (2, 2, 3), (factor,) * 3)[:, 0]
        # masked positions hold the level's mask token
        z_last = z.permute(0, 2, 3, 4, 1)  # channels last
        assert torch.equal(z_last[masked], token.flatten().expand(int(masked.sum()), -1))
        # visible positions: the encoder features normalised with statistics of the visible voxels only
        f_last = features[stage].permute(0, 2, 3, 4, 1)
        for group in [[0, 1]] if pooling == "batch" else [[0], [1]]:
            f = torch.cat([f_last[b][~masked[b]] for b in group])  # (N, C)
            expected = (f - f.mean(0)) / torch.sqrt(
                f.var(0, correction=0) + norm.eps
            ) * norm.weight + norm.bias
            got = torch.cat([z_last[b][~masked[b]] for b in group])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mask_tokens_only_fill_masked_positions():
    model = tiny_model()
    x = torch.randn(2, 1, 32, 32, 48)
    model(x, torch.zeros(2, 12, dtype=torch.bool)).square().sum().backward()
    assert all(t.grad is None or torch.all(t.grad == 0) for t in model.mask_tokens)
    model.zero_grad(set_to_none=True)
    model(x, random_mask(2, 12, 4)).square().sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in model.mask_tokens)
    assert all(p.grad is not None for p in model.parameters())


def test_spconv_model_can_be_copied_and_pickled():
    """The EMA teacher deep-copies the student; checkpoints may pickle whole modules."""
    needs("spconv")
    model = tiny_model(backend="spconv").eval()
    x = torch.randn(1, 1, 32, 32, 48)
    mask = random_mask(1, 12, 5)
    clone = copy.deepcopy(model)
    assert clone.sparse_encoder.backend == "spconv"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        out = model(x, mask)
        assert torch.equal(clone(x, mask), out)
        assert torch.equal(restored(x, mask), out)


# ---------------------------------------------------------------------------------------------
# decoders


def test_light_decoder_upsamples_by_the_mask_unit_and_adds_every_skip():
    torch.manual_seed(0)
    dec = LightDecoder(width=32, upsample_ratio=16, out_channels=2).eval()
    assert dec.level_widths == [32, 16, 8, 4]
    feats = [torch.randn(1, 32 // 2**i, 2 * 2**i, 2 * 2**i, 3 * 2**i) for i in range(4)]
    out = dec(feats)
    assert out.shape == (1, 2, 32, 32, 48)
    for i in range(4):
        changed = list(feats)
        changed[i] = feats[i] + 1.0
        assert not torch.allclose(dec(changed), out)
    assert dec([feats[0], None, None, None]).shape == out.shape
    with pytest.raises(ValueError):
        LightDecoder(width=32, upsample_ratio=12)


def test_simple_decoder_puts_each_prediction_in_its_own_patch():
    """The voxel of the deepest grid at (i, j, k) predicts the patch at (i, j, k), voxels in order."""
    patch = (2, 3, 4)
    dec = SimpleDecoder(width=1, patch_size=patch, out_channels=1)
    dec.blocks = torch.nn.Identity()
    n = 2 * 3 * 4
    with torch.no_grad():
        dec.proj.weight.copy_(torch.arange(1, n + 1, dtype=torch.float32).reshape(n, 1, 1, 1, 1))
        dec.proj.bias.zero_()
    grid = (2, 3, 2)
    patch_id = torch.arange(12, dtype=torch.float32).reshape(1, 1, *grid)
    out = dec([patch_id])
    assert out.shape == (1, 1, 4, 9, 8)
    for i in range(2):
        for j in range(3):
            for k in range(2):
                block = out[0, 0, i * 2 : (i + 1) * 2, j * 3 : (j + 1) * 3, k * 4 : (k + 1) * 4]
                expected = patch_id[0, 0, i, j, k] * torch.arange(1, n + 1, dtype=torch.float32)
                assert torch.equal(block.reshape(-1), expected)
    # consistent with the loss's patch order
    assert torch.equal(patchify(out, patch)[0], patch_id.reshape(12, 1) * torch.arange(1, n + 1))
