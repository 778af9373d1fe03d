"""AutoPET: CT and PET as one 2-channel file (what MONAI Label hands a bundle: one image path per study)
give the same prediction as the two files CTres.nii.gz + SUV.nii.gz."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from finetune_common import TINY, infer, workflow
from monai.transforms import LoadImaged

from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.phantoms import make_affine, make_pet_ct_phantom, phantom_fingerprint
from anatomask_components.data.writers import write_volume
from anatomask_components.networks import STUNet

BUNDLE = "anatomask_finetune_autopet"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("autopet_single_file")
    affine = make_affine((2.0, 2.0, 3.0), flip=(True, True, False), rotation_deg=(0, 5, -12))
    ct, suv, _, affine = make_pet_ct_phantom((40, 36, 30), num_lesions=1, seed=3, affine=affine)
    folder = root / "PETCT_x" / "03-03-2003-NA-PET-CT"
    write_volume(folder / "CTres.nii.gz", ct, affine)
    write_volume(folder / "SUV.nii.gz", suv, affine)
    single = root / "single" / "PETCT_x.nii.gz"
    single.parent.mkdir()
    nib.save(nib.Nifti1Image(np.stack([ct, suv], axis=-1).astype(np.float32), affine), single)
    model = root / "model.pt"
    torch.manual_seed(0)
    torch.save(STUNet(2, 2, **TINY).state_dict(), model)
    write_fingerprint(model, phantom_fingerprint())
    return {"root": root, "pair": folder, "single": single, "model": model}


def _monai_label_style(image, model: Path, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What MONAI Label's BundleInferTask does with inference.json: preprocessing, inferer, postprocessing."""
    flow = workflow(
        BUNDLE,
        ["inference.json", "small_override.json"],
        "infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(tmp_path),
        model_path=str(model),  # its fingerprint.json beside it holds the CT normalisation
    )
    parser = flow.parser
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(model, weights_only=True), strict=True)
    network.eval()
    pre = list(parser.get_parsed_content("preprocessing").transforms)
    assert isinstance(pre[0], LoadImaged)
    item = {"image": image, "image_path": image if isinstance(image, str) else image[0]}
    for transform in pre:
        item = transform(item)
    assert item["image"].shape[0] == 2
    preprocessed = item["image"].as_tensor().clone()
    with torch.no_grad():
        item["pred"] = parser.get_parsed_content("inferer")(item["image"][None], network)[0]
    for transform in parser.get_parsed_content("postprocessing").transforms:
        item = transform(item)
    return preprocessed, item["pred"]


def test_two_channel_file_equals_the_file_pair(study, tmp_path):
    pair = [str(study["pair"] / "CTres.nii.gz"), str(study["pair"] / "SUV.nii.gz")]
    image_pair, from_pair = _monai_label_style(pair, study["model"], tmp_path / "pair")
    image_single, from_single = _monai_label_style(str(study["single"]), study["model"], tmp_path / "single")
    assert torch.equal(image_pair, image_single)  # CT z-scored, PET in SUV, both resampled alike
    assert tuple(from_single.shape) == (1, 40, 36, 30)
    assert torch.equal(from_pair.as_tensor(), from_single.as_tensor())
    np.testing.assert_allclose(np.asarray(from_single.affine), nib.load(study["single"]).affine, atol=1e-4)


def test_bundle_inference_on_a_two_channel_file(study, tmp_path):
    predictions = infer(BUNDLE, tmp_path, study["single"], study["model"], channel_files=None, progress=False)
    written = nib.load(predictions / "PETCT_x_seg.nii.gz")
    assert written.shape == (40, 36, 30)
    np.testing.assert_allclose(written.affine, nib.load(study["single"]).affine, atol=1e-4)
