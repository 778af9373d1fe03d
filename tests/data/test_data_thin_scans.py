"""Thin scans segment like whole ones: a network fine-tuned with the bundles' pipeline (crops past the border
and thin slabs, padded with 0) labels a slab of a few slices as it labels the same slices of the whole scan,
when both go through the sliding window the bundles infer with (padding 0).

The same check on real CT (slabs of case A as thick as case C, labelled by the demo's fine-tuned models) is
``tests/test_demo.py::test_quick_demo_model_labels_a_slab_of_case_a_as_thin_as_case_c_like_the_whole_scan``;
it needs the demo's output, as the other demo tests do."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss

from anatomask_components.data.phantoms import make_affine, make_phantom, phantom_fingerprint
from anatomask_components.data.preprocessing import finetune_train_transforms, finetune_val_transforms
from anatomask_components.data.writers import write_volume
from anatomask_components.evaluation import case_metrics
from anatomask_components.networks import STUNet


def _dice(prediction: np.ndarray, reference: np.ndarray, labels) -> dict[int, float]:
    rows = case_metrics(prediction, reference, (3.0, 3.0, 3.0), {int(k): str(k) for k in labels})
    return {row["label"]: row["dsc"] for row in rows}


def _fit(
    items: list[dict],
    roi: tuple[int, int, int],
    spacing: tuple[float, float, float],
    fingerprint: dict,
    num_classes: int,
    iterations: int,
    dims: tuple[int, ...],
    seed: int = 0,
) -> torch.nn.Module:
    """Fine-tune a small STU-Net with the bundles' training pipeline (nnU-Net's augmentation, defaults)."""
    torch.manual_seed(seed)
    transforms = finetune_train_transforms(
        roi_size=roi,
        spacing=spacing,
        normalization="ct",
        fingerprint=fingerprint,
        num_classes=num_classes,
        num_samples=2,
    )
    transforms.set_random_state(seed=seed)
    loader = DataLoader(Dataset(items * iterations, transforms), batch_size=1, num_workers=0)
    network = STUNet(1, num_classes, depths=[1] * len(dims), dims=list(dims), deep_supervision=False)
    network.train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-5)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    for batch in loader:
        optimiser.zero_grad()
        loss = loss_function(network(batch["image"].as_tensor()), batch["label"].as_tensor())
        loss.backward()
        optimiser.step()
    return network.eval()


def _segment(network: torch.nn.Module, image: torch.Tensor, roi) -> np.ndarray:
    inferer = SlidingWindowInferer(
        roi, sw_batch_size=2, overlap=0.5, mode="gaussian", sigma_scale=0.125, cval=0.0
    )
    with torch.no_grad():
        return inferer(image[None], network).argmax(1)[0].numpy()


def _slab_agreement(
    network, image: torch.Tensor, whole: np.ndarray, roi, start: int, thickness: int, min_voxels: int
) -> dict:
    """DSC between the slab's own label map and the whole scan's label map ``whole`` on the slab's slices."""
    whole = whole[..., start : start + thickness]
    slab = _segment(network, image[..., start : start + thickness].clone(), roi)
    organs = [int(v) for v in np.unique(whole) if v > 0 and (whole == v).sum() >= min_voxels]
    return _dice(slab, whole, organs)


def test_phantom_slab_agrees_with_the_whole_scan(tmp_path):
    affine = make_affine((3.0, 3.0, 3.0))
    items = []
    for seed in range(2):
        image, label, _ = make_phantom((48, 44, 40), num_classes=4, seed=seed, affine=affine)
        items.append(
            {
                "image": str(write_volume(tmp_path / f"image_{seed}.nii.gz", image, affine)),
                "label": str(write_volume(tmp_path / f"label_{seed}.nii.gz", label.astype(np.uint8), affine)),
            }
        )
    roi = (32, 32, 16)
    network = _fit(items, roi, (3.0, 3.0, 3.0), phantom_fingerprint(), 4, iterations=60, dims=(8, 16, 32, 64))
    test_image, test_label, _ = make_phantom((48, 44, 40), num_classes=4, seed=7, affine=affine)
    test = {
        "image": str(write_volume(tmp_path / "test.nii.gz", test_image, affine)),
        "label": str(write_volume(tmp_path / "test_label.nii.gz", test_label.astype(np.uint8), affine)),
    }
    case = finetune_val_transforms((3.0, 3.0, 3.0), "ct", phantom_fingerprint(), num_classes=4)(test)
    whole = _segment(network, case["image"].as_tensor(), roi)
    fitted = _dice(whole, case["label"][0].numpy().round(), [1, 2, 3])
    # it fits the unseen whole phantom's bright organ (160 HU; organs 1 and 3 are 20 and 5 HU from the body)
    assert fitted[2] >= 0.9, fitted
    # 5-slice slabs (a third of the window's depth) at the top, middle and bottom of the predicted organs
    slices = np.flatnonzero((whole > 0).sum(axis=(0, 1)) >= 30)
    starts = sorted({int(slices[0]), int(slices[len(slices) // 2]) - 2, int(slices[-1]) - 4})
    for start in starts:
        agreement = _slab_agreement(network, case["image"].as_tensor(), whole, roi, start, 5, min_voxels=30)
        assert agreement and np.mean(list(agreement.values())) >= 0.8, (start, agreement)
