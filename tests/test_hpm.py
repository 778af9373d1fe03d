"""Hard Patches Mining (SelfMedHPM's mask generator, docs/method.md §12): losses, predictors, iteration."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import UNETR, ViT
from pretrain_common import TINY_STUNET, iteration_engine

from anatomask_components.checkpointing import atomic_save
from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.losses import loss_prediction_loss, patch_scores
from anatomask_components.masking import HardRatioSchedule, num_hard, num_masked, random_patch_mask
from anatomask_components.networks import (
    AnatoMaskPretrainModel,
    MAEPretrainModel,
    PretrainingNetwork,
    STUNet,
    fine_tuning_contract,
)
from anatomask_components.networks.decoders import PatchLossHead
from anatomask_components.networks.vit import vit_filter_fn, vit_key_map
from anatomask_components.patches import patchify, unpatchify
from anatomask_components.strategies import LossPredictorMasking, RandomMasking
from anatomask_components.teacher import EMATeacher
from anatomask_components.weights import VIT_INPUT_CONV_KEYS, transfer_weights

# mask unit 8^3 (three stride-2 stages): 64 patches on a 32^3 crop, enough that a mask ignoring the
# teacher contains its top-k patches only by a negligible chance
# hidden sizes divisible by 6 (3D sin-cos position embeddings) and by the number of heads
TINY_VIT = {
    "img_size": (32, 32, 32),
    "hidden_size": 48,
    "mlp_dim": 64,
    "num_layers": 12,
    "num_heads": 4,
    "decoder_hidden_size": 24,
    "decoder_mlp_dim": 32,
    "decoder_num_layers": 2,
    "decoder_num_heads": 4,
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors without ties."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ---------------------------------------------------------------------------------------------
# the predictor's losses


def test_relative_loss_by_hand_with_a_tie_and_a_visible_patch():
    prediction = torch.tensor([[0.0, 1.0, -1.0, 5.0]])
    target = torch.tensor([[1.0, 2.0, 2.0, 9.0]])  # patches 1 and 2 tie; patch 3 is visible
    mask = torch.tensor([[True, True, True, False]])
    # valid ordered pairs: (0,1), (1,0), (0,2), (2,0); (1,2) and (2,1) tie, pairs with patch 3 are not masked.
    # (0, 1): label loss_1 > loss_0 = 1, logit p1 - p0 = 1 -> -log sigmoid(1); (1, 0): label 0, logit -1
    # -> -log(1 - sigmoid(-1)) = -log sigmoid(1): both orders give the same term. (0, 2): -log sigmoid(-1).
    expected = (2 * math.log1p(math.exp(-1.0)) + 2 * math.log1p(math.exp(1.0))) / 4
    loss = loss_prediction_loss(prediction, target, mask, "relative")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.813262, abs=1e-6)
    # the visible patch's prediction has no effect, however wrong
    moved = prediction.clone()
    moved[0, 3] = -50.0
    assert loss_prediction_loss(moved, target, mask, "relative").item() == pytest.approx(expected, rel=1e-6)


def test_relative_loss_is_averaged_over_the_valid_pairs_of_the_batch():
    prediction = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([[1.0, 2.0, 2.0], [3.0, 3.0, 3.0]])  # the second image has only ties
    mask = torch.ones(2, 3, dtype=torch.bool)
    first = loss_prediction_loss(prediction[:1], target[:1], mask[:1])
    assert loss_prediction_loss(prediction, target, mask).item() == pytest.approx(first.item(), rel=1e-6)
    assert loss_prediction_loss(prediction[1:], target[1:], mask[1:]).item() == 0.0


def test_absolute_loss_by_hand():
    prediction = torch.tensor([[0.0, 1.0, 2.0, 7.0]])
    target = torch.tensor([[1.0, 2.0, 6.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    # masked losses 1, 2, 6: mean 3, unbiased variance (4 + 1 + 9) / 2 = 7
    z = [(v - 3.0) / math.sqrt(7.0 + 1e-6) for v in (1.0, 2.0, 6.0)]
    expected = sum((p - t) ** 2 for p, t in zip((0.0, 1.0, 2.0), z)) / 3
    assert loss_prediction_loss(prediction, target, mask, "absolute").item() == pytest.approx(
        expected, rel=1e-6
    )


def test_the_predictor_loss_does_not_move_its_targets():
    target = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    prediction = torch.zeros(1, 3, requires_grad=True)
    loss_prediction_loss(prediction, target, torch.ones(1, 3, dtype=torch.bool)).backward()
    assert target.grad is None and prediction.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        loss_prediction_loss(prediction, target, torch.ones(1, 3, dtype=torch.bool), "ranking")


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_the_head_learns_to_rank_losses_that_depend_on_a_visible_feature(kind):
    """Each patch's loss is a function of the patch's own feature; the head must learn the order."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = PatchLossHead(width=4)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)

    def sample(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.randn(batch, 4, 4, 4, 4, generator=gen)
        noise = 0.1 * torch.randn(batch, 64, generator=gen)
        return features, features[:, 1].flatten(1).exp() + noise  # (B, L) true patch losses

    for _ in range(300):
        features, losses = sample(4)
        mask = random_patch_mask(4, 64, 0.75, generator=gen)
        optimizer.zero_grad()
        loss_prediction_loss(head(features), losses, mask, kind).backward()
        optimizer.step()
    head.eval()
    features, losses = sample(8)
    with torch.no_grad():
        predicted = head(features)
    correlations = [spearman(p, t) for p, t in zip(predicted, losses)]
    assert min(correlations) > 0.5, correlations


# ---------------------------------------------------------------------------------------------
# loss predictors of the two pretraining networks


def tiny_stunet(seed: int = 0, **options) -> AnatoMaskPretrainModel:
    torch.manual_seed(seed)
    return AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), **options)


def test_the_loss_predictor_is_off_by_default():
    default = tiny_stunet()
    assert default.loss_predictor is None
    assert not any(k.startswith("loss_predictor") for k in default.state_dict())
    with pytest.raises(ValueError, match="no loss predictor"):
        default(
            torch.randn(1, 1, 32, 32, 32), torch.zeros(1, 64, dtype=torch.bool), return_loss_prediction=True
        )
    with pytest.raises(ValueError):
        tiny_stunet(loss_predictor="mlp")


@pytest.mark.parametrize("kind", ["head", "decoder"])
@pytest.mark.parametrize("decoder", ["hierarchical", "simple"])
def test_stunet_loss_predictor_gives_one_value_per_patch(kind, decoder):
    model = tiny_stunet(loss_predictor=kind, decoder=decoder).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    mask = random_patch_mask(2, 64, 0.6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reconstruction, predicted = model(x, mask, return_loss_prediction=True)
        assert torch.equal(reconstruction, model(x, mask))
        assert predicted.shape == (2, 64)
        torch.testing.assert_close(model.predict_patch_losses(x, mask), predicted)
        unmasked = model.predict_patch_losses(x)
    assert unmasked.shape == (2, 64) and not torch.equal(unmasked, predicted)


def tiny_vit(seed: int = 0, **kwargs) -> MAEPretrainModel:
    torch.manual_seed(seed)
    return MAEPretrainModel(**(TINY_VIT | kwargs))


@pytest.mark.parametrize("kind", [None, "head", "decoder"])
def test_vit_mae_reconstructs_from_visible_patches_only(kind):
    model = tiny_vit(loss_predictor=kind).eval()
    assert model.patch_size == (16, 16, 16) and model.num_patches((32, 32, 32)) == 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, 32, generator=gen)
    mask = random_patch_mask(2, 8, 0.75, generator=gen)
    assert mask.sum(dim=1).tolist() == [6, 6]
    # masked patches replaced by large noise: the output does not change
    patches = patchify(x, model.patch_size)
    noisy = torch.where(mask[..., None], 1e3 * torch.randn(patches.shape, generator=gen), patches)
    x2 = unpatchify(noisy, model.patch_size, (2, 2, 2))
    with torch.no_grad():
        out = model(x, mask)
        assert out.shape == x.shape
        assert torch.equal(out, model(x2, mask))
        if kind is not None:
            _, predicted = model(x, mask, return_loss_prediction=True)
            assert predicted.shape == (2, 8)
            torch.testing.assert_close(model.predict_patch_losses(x, mask), predicted)
            assert model.predict_patch_losses(x).shape == (2, 8)
    with pytest.raises(ValueError, match="fixed to"):
        model(torch.randn(1, 1, 48, 32, 32), torch.zeros(1, 12, dtype=torch.bool))
    uneven = torch.zeros(2, 8, dtype=torch.bool)
    uneven[0, :3] = True
    with pytest.raises(ValueError, match="same number"):
        model(x, uneven)


# ---------------------------------------------------------------------------------------------
# the iteration


@pytest.mark.parametrize("network", ["stunet", "vit"])
def test_hpm_masks_the_teachers_top_predicted_losses_on_the_unmasked_input(network):
    # 64 patches (STU-Net) and 27 (ViT, 48^3): a mask that ignored the teacher would hold its top-k
    # patches with probability below 1e-3
    if network == "stunet":
        student, ratio, shape = tiny_stunet(loss_predictor="head"), 0.6, (32, 32, 32)
    else:
        student, ratio, shape = tiny_vit(loss_predictor="decoder", img_size=(48, 48, 48)), 0.75, (48, 48, 48)
    length = student.num_patches(shape)
    teacher = EMATeacher(student)
    with torch.no_grad():  # an EMA teacher that already differs from the student
        for p in teacher.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    seen: dict[str, torch.Tensor] = {}
    predict = teacher.teacher.predict_patch_losses

    def recording_predict(x, mask=None):
        seen["teacher_mask"], seen["predicted"] = mask, predict(x, mask)
        return seen["predicted"]

    teacher.teacher.predict_patch_losses = recording_predict
    student.register_forward_pre_hook(lambda m, args: seen.__setitem__("student_mask", args[1].clone()))
    schedule = HardRatioSchedule(total_epochs=1, start=0.5, end=0.5)
    step = AnatoMaskIteration(LossPredictorMasking(teacher, schedule, ratio), predictor_loss="relative")
    x = torch.randn(2, 1, *shape)
    engine = iteration_engine(student)
    before = {k: v.clone() for k, v in student.loss_predictor.state_dict().items()}
    output = step(engine, {"image": x})

    n_masked = num_masked(length, ratio)
    k = num_hard(n_masked, 0.5)
    assert output["num_hard"] == k > 0
    assert seen["teacher_mask"] is None  # the teacher ranks patches of the unmasked input
    student_mask = seen["student_mask"]
    assert student_mask.sum(dim=1).tolist() == [n_masked] * 2
    top = seen["predicted"].topk(k, dim=1).indices
    assert student_mask.gather(1, top).all()
    # the loss predictor was trained alongside the reconstruction
    assert math.isfinite(float(output["predictor_loss"])) and float(output["predictor_loss"]) > 0
    assert float(output["loss"]) == pytest.approx(
        float(output["reconstruction_loss"]) + float(output["predictor_loss"]), rel=1e-5
    )
    after = student.loss_predictor.state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_hpm_needs_a_loss_predictor():
    student = tiny_stunet()
    step = AnatoMaskIteration(LossPredictorMasking(EMATeacher(student), HardRatioSchedule(1, 0.5, 0.5), 0.6))
    with pytest.raises(ValueError, match="loss predictor"):
        step(iteration_engine(student), {"image": torch.randn(1, 1, 32, 32, 32)})
    with pytest.raises(ValueError, match="teacher"):
        LossPredictorMasking(teacher=None, schedule=None, mask_ratio=0.6)


def test_iteration_loss_is_the_reference_reconstruction_loss_without_a_predictor():
    student = tiny_stunet()
    step = AnatoMaskIteration(RandomMasking(0.6))
    x = torch.randn(2, 1, 32, 32, 32)
    masks = []
    student.register_forward_pre_hook(lambda m, args: masks.append(args[1].clone()))
    state = {k: v.clone() for k, v in student.state_dict().items()}
    output = step(iteration_engine(student), {"image": x})
    assert "predictor_loss" not in output
    reference = tiny_stunet()
    reference.load_state_dict(state)
    reference.train()
    per_patch = patch_scores(reference(x, masks[0]), x, reference.patch_size, normalized_target=True)
    expected = (per_patch * masks[0]).sum() / masks[0].sum()
    assert float(output["loss"]) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# ViT encoder -> UNETR


def tiny_unetr(in_channels: int = 1):
    torch.manual_seed(1)
    return UNETR(in_channels, 3, (32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=64, num_heads=4)


# MONAI's ViT: patch embedding (position embeddings, conv weight and bias), 12 blocks of 13 tensors
# (norm1, norm2 and the unused cross-attention norm: 2 each; qkv weight; out_proj weight and bias; two MLP
# linears: 2 each), the final LayerNorm (2)
VIT_TENSORS = 3 + 12 * 13 + 2


def test_vit_encoder_export_loads_strictly_into_monai_vit():
    encoder = tiny_vit(loss_predictor="decoder").encoder_state_dict()
    assert len(encoder) == VIT_TENSORS
    assert {"norm.weight", "norm.bias"} <= set(encoder) and "blocks.12.weight" not in encoder
    vit = ViT(1, (32, 32, 32), 16, hidden_size=48, mlp_dim=64, num_layers=12, num_heads=4)
    vit.load_state_dict(encoder, strict=True)


@pytest.mark.parametrize("source", ["encoder", "model", "checkpoint"])
def test_vit_encoder_transfers_to_unetr_with_a_report(source, tmp_path):
    mae = tiny_vit(loss_predictor="decoder")
    encoder = mae.encoder_state_dict()
    if source == "encoder":
        content = encoder
    elif source == "model":
        content = mae.state_dict()
    else:
        content = {
            "student": mae.state_dict(),
            "teacher": {"teacher": mae.state_dict(), "last_momentum": 0.9},
        }
    path = atomic_save(content, tmp_path / f"{source}.pt")
    unetr = tiny_unetr()
    initial = {k: v.clone() for k, v in unetr.state_dict().items()}
    report = transfer_weights(unetr, path)
    total = len(unetr.state_dict())
    assert report.num_network_tensors == total
    assert report.num_transferred == len(report.loaded) == VIT_TENSORS
    assert len(report.missing) == total - VIT_TENSORS and not report.shape_mismatch and not report.adapted
    assert all(k.startswith("vit.") for k in report.loaded)
    assert not any(k.startswith("vit.") for k in report.missing)
    if source == "encoder":
        assert report.unused == []
    else:  # the class token, the decoder and the loss predictor stay behind
        assert {"cls_token", "mask_tokens", "decoder_embed.weight", "loss_predictor.embed.weight"} <= set(
            report.unused
        )
        assert not any(k.startswith(("patch_embedding.", "blocks.")) for k in report.unused)
    state = unetr.state_dict()
    for key, value in encoder.items():
        assert torch.equal(state["vit." + key], value), key
    for key in report.missing:
        assert torch.equal(state[key], initial[key]), key
    assert f"{VIT_TENSORS} of {total} network tensors loaded" in report.summary()


def test_vit_patch_embedding_is_adapted_to_two_input_channels():
    encoder = tiny_vit().encoder_state_dict()
    unetr = tiny_unetr(in_channels=2)
    report = transfer_weights(unetr, encoder)
    assert set(report.adapted) == set(VIT_INPUT_CONV_KEYS)
    assert report.num_transferred == VIT_TENSORS and len(report.loaded) == VIT_TENSORS - 1
    kernel = encoder["patch_embedding.patch_embeddings.weight"]
    expected = (kernel / 2).expand(-1, 2, *kernel.shape[2:])
    assert torch.equal(unetr.state_dict()[VIT_INPUT_CONV_KEYS[0]], expected)
    # a UNETR state dict (e.g. a fine-tuned model.pt) loads one to one
    again = transfer_weights(tiny_unetr(in_channels=2), unetr.state_dict(), require_all=True)
    assert again.num_transferred == len(unetr.state_dict()) and again.unused == []


def test_both_pretraining_networks_declare_the_protocol():
    """The iteration, teacher, exporter and inference use only what PretrainingNetwork declares."""
    for model in (AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), loss_predictor="head"), tiny_vit()):
        assert isinstance(model, PretrainingNetwork), type(model).__name__
        grid = [32 // p for p in model.patch_size]
        assert model.num_patches((32, 32, 32)) == grid[0] * grid[1] * grid[2]
    assert not isinstance(STUNet(1, 2, size="tiny"), PretrainingNetwork)


def test_unetr_contract_is_registered_beside_the_vit():
    contract = fine_tuning_contract(tiny_unetr())
    assert contract.input_conv_keys == VIT_INPUT_CONV_KEYS
    encoder = tiny_vit().encoder_state_dict()
    assert contract.key_map(list(encoder)) == vit_key_map(list(encoder))
    # timm-style filter: the pretraining encoder under UNETR keys, loadable into its ViT
    filtered = vit_filter_fn(encoder)
    assert set(filtered) == set(vit_key_map(list(encoder)))
    assert contract.filter_state_dict(encoder).keys() == filtered.keys()
    tiny_unetr().load_state_dict(filtered, strict=False)
