"""STU-Net: preset sizes, official key layout, residual block, deep supervision (docs/method.md §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anatomask_components.networks.stunet import (
    STUNET_PRESETS,
    BasicResBlock,
    STUNet,
    count_parameters,
    print_presets,
)

# docs/method.md §3.2, 1 input and 105 output channels, in millions
PAPER_PARAMS_M = {"S": 14.60, "B": 58.26, "L": 440.30, "H": 1457.33}
PAPER_PRESETS = {
    "S": (1, (16, 32, 64, 128, 256, 256)),
    "B": (1, (32, 64, 128, 256, 512, 512)),
    "L": (2, (64, 128, 256, 512, 1024, 1024)),
    "H": (3, (96, 192, 384, 768, 1536, 1536)),
}

TINY_DIMS = (4, 8, 8, 16, 16, 16)


def official_stunet_shapes(
    in_channels: int, out_channels: int, blocks: int, dims: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released STU-Net checkpoint, written from the description alone.

    Residual block: conv1 (k3, bias), norm1 (IN affine), conv2 (k3, bias), norm2, and a 1x1 shortcut
    conv3 in the first block of each stage only. Encoder stage s maps dims[s-1] (or the input) to
    dims[s]; decoder stage u upsamples dims[-1-u] -> dims[-2-u] (1x1 conv), concatenates the skip and
    runs residual blocks 2 * dims[-2-u] -> dims[-2-u]; one 1x1 segmentation head per decoder stage.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, cin: int, cout: int, first: bool) -> None:
        shapes[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3, 3)
        shapes[f"{prefix}.conv1.bias"] = (cout,)
        shapes[f"{prefix}.norm1.weight"] = (cout,)
        shapes[f"{prefix}.norm1.bias"] = (cout,)
        shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3, 3)
        shapes[f"{prefix}.conv2.bias"] = (cout,)
        shapes[f"{prefix}.norm2.weight"] = (cout,)
        shapes[f"{prefix}.norm2.bias"] = (cout,)
        if first:
            shapes[f"{prefix}.conv3.weight"] = (cout, cin, 1, 1, 1)
            shapes[f"{prefix}.conv3.bias"] = (cout,)

    n = len(dims)
    for s in range(n):
        cin = in_channels if s == 0 else dims[s - 1]
        for b in range(blocks):
            block(f"conv_blocks_context.{s}.{b}", cin if b == 0 else dims[s], dims[s], b == 0)
    for u in range(n - 1):
        hi, lo = dims[n - 1 - u], dims[n - 2 - u]
        shapes[f"upsample_layers.{u}.conv.weight"] = (lo, hi, 1, 1, 1)
        shapes[f"upsample_layers.{u}.conv.bias"] = (lo,)
        for b in range(blocks):
            block(f"conv_blocks_localization.{u}.{b}", 2 * lo if b == 0 else lo, lo, b == 0)
        shapes[f"seg_outputs.{u}.weight"] = (out_channels, lo, 1, 1, 1)
        shapes[f"seg_outputs.{u}.bias"] = (out_channels,)
    return shapes


def test_presets_match_the_paper_table():
    for name, (blocks, dims) in PAPER_PRESETS.items():
        depths, widths = STUNET_PRESETS[name]
        assert tuple(depths) == (blocks,) * 6
        assert tuple(widths) == dims


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_preset_parameter_count(size):
    with torch.device("meta"):
        net = STUNet(1, 105, size=size)
    assert count_parameters(net) / 1e6 == pytest.approx(PAPER_PARAMS_M[size], abs=0.005)
    # the independent description of the layout gives the same count
    blocks, dims = PAPER_PRESETS[size]
    official = official_stunet_shapes(1, 105, blocks, dims)
    assert count_parameters(net) == sum(torch.Size(s).numel() for s in official.values())


def test_print_presets_reports_the_counts(capsys):
    counts = print_presets(1, 105)
    out = capsys.readouterr().out
    assert set(counts) == {*PAPER_PARAMS_M, "tiny"}
    for name, millions in PAPER_PARAMS_M.items():
        assert counts[name] / 1e6 == pytest.approx(millions, abs=0.005)
        assert f"{millions:.2f}M" in out


def test_stunet_b_official_key_layout_loads_strictly():
    official = official_stunet_shapes(1, 105, 1, PAPER_PRESETS["B"][1])
    assert len(official) == 130
    with torch.device("meta"):
        net = STUNet(1, 105, size="B")
        state = {k: torch.empty(s) for k, s in official.items()}
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == official
    result = net.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("size", ["L", "H"])
def test_deeper_presets_official_key_layout(size):
    blocks, dims = PAPER_PRESETS[size]
    with torch.device("meta"):
        net = STUNet(1, 105, size=size)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == official_stunet_shapes(1, 105, blocks, dims)
    # the shortcut projection exists only in the first block of each stage
    assert all(stage[b].conv3 is None for stage in net.conv_blocks_context for b in range(1, blocks))


def test_official_state_dict_loads_into_a_real_tiny_net_and_lands_in_place():
    shapes = official_stunet_shapes(2, 3, 2, TINY_DIMS)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    net = STUNet(2, 3, depths=(2,) * 6, dims=TINY_DIMS)
    net.load_state_dict(state, strict=True)
    assert torch.equal(
        net.conv_blocks_context[2][0].conv3.weight, state["conv_blocks_context.2.0.conv3.weight"]
    )
    assert torch.equal(net.conv_blocks_context[2][1].norm2.bias, state["conv_blocks_context.2.1.norm2.bias"])
    assert torch.equal(net.upsample_layers[0].conv.weight, state["upsample_layers.0.conv.weight"])
    assert torch.equal(net.seg_outputs[4].weight, state["seg_outputs.4.weight"])
    # a key from another layout is refused
    bad = dict(state)
    bad["conv_blocks_context.0.1.conv3.weight"] = torch.zeros(4, 4, 1, 1, 1)
    with pytest.raises(RuntimeError):
        net.load_state_dict(bad, strict=True)


def test_residual_block_matches_the_description():
    torch.manual_seed(0)
    block = BasicResBlock(3, 5, stride=2, use_1x1conv=True)
    for p in block.parameters():  # non-trivial affine parameters
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 8, 8, 6)

    def inorm(t, norm):
        return F.instance_norm(t, weight=norm.weight, bias=norm.bias, eps=1e-5)

    y = F.conv3d(x, block.conv1.weight, block.conv1.bias, stride=2, padding=1)
    y = F.leaky_relu(inorm(y, block.norm1), 0.01)
    y = inorm(F.conv3d(y, block.conv2.weight, block.conv2.bias, padding=1), block.norm2)
    shortcut = F.conv3d(x, block.conv3.weight, block.conv3.bias, stride=2)
    expected = F.leaky_relu(y + shortcut, 0.01)
    torch.testing.assert_close(block(x.clone()), expected, rtol=1e-5, atol=1e-5)

    plain = BasicResBlock(5, 5)
    assert plain.conv3 is None
    z = torch.randn(1, 5, 4, 4, 4)
    ref = F.leaky_relu(plain.norm2(plain.conv2(F.leaky_relu(plain.norm1(plain.conv1(z)), 0.01))) + z, 0.01)
    torch.testing.assert_close(plain(z.clone()), ref)


def _tiny_net(deep_supervision=True):
    torch.manual_seed(0)
    return STUNet(1, 3, depths=(1,) * 6, dims=TINY_DIMS, deep_supervision=deep_supervision)


def test_deep_supervision_outputs_full_resolution_first_without_the_coarsest():
    net = _tiny_net().train()
    assert net.total_stride == (16, 16, 16)
    x = torch.randn(2, 1, 32, 32, 48)
    outs = net(x)
    assert isinstance(outs, list | tuple)
    # 5 decoder stages -> 5 heads, the coarsest (1/16) is left out
    assert [tuple(o.shape) for o in outs] == [
        (2, 3, 32, 32, 48),
        (2, 3, 16, 16, 24),
        (2, 3, 8, 8, 12),
        (2, 3, 4, 4, 6),
    ]
    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32, 48)
    # instance norm has no running statistics: eval output is the full-resolution training output
    torch.testing.assert_close(out, outs[0])
    # each lower-resolution output comes from its own head
    net.train()
    with torch.no_grad():
        net.seg_outputs[3].bias.add_(1.0)  # 1/2-resolution head (u = 3)
    outs2 = net(x)
    torch.testing.assert_close(outs2[1], outs[1] + 1.0)
    torch.testing.assert_close(outs2[0], outs[0])


def test_without_deep_supervision_training_returns_one_tensor():
    net = _tiny_net(deep_supervision=False).train()
    out = net(torch.randn(1, 1, 32, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 32)


def test_strides_plan_and_validation():
    net = STUNet(1, 2, depths=(1,) * 6, dims=TINY_DIMS, strides=[2, 2, 2, 2, (1, 1, 2)])
    assert net.total_stride == (16, 16, 32)
    assert net.eval()(torch.randn(1, 1, 32, 32, 64)).shape == (1, 2, 32, 32, 64)
    with pytest.raises(ValueError):
        STUNet(size="X")
    with pytest.raises(ValueError):
        STUNet(depths=(1,) * 6)
    with pytest.raises(ValueError):
        STUNet(depths=(1,) * 6, dims=TINY_DIMS, strides=[2, 2])
