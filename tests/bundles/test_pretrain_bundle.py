"""The anatomask_pretrain bundle: properties, short runs in each mode, DDP on CPU, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.patches import patchify
from anatomask_components.strategies import RandomMasking, TeacherReconstructionMasking

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "anatomask_pretrain"
CONFIGS = BUNDLE / "configs"
SMALL = str(CONFIGS / "small_override.json")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain_scans")
    write_phantom_dataset(root, n_cases=2, shape=(40, 40, 44), layout="folder", seed=3)
    return root


def _workflow(config_files, workflow_type: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(c) for c in config_files],
        workflow_type=workflow_type,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **overrides,
    )
    workflow.initialize()
    return workflow


def _train(
    bundle_root: Path,
    scans: Path,
    stop_after: int | None = None,
    method_configs: Sequence[Path] = (),
    **overrides,
):
    """Run training in-process (``method_configs``: overrides of the method between train.json and the small
    network's); returns the per-iteration outputs and the workflow."""
    workflow = _workflow(
        [CONFIGS / "train.json", *method_configs, SMALL],
        "train",
        bundle_root=str(bundle_root),
        dataset_dir=str(scans),
        batch_size=1,
        **overrides,
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    outputs = []

    def record(engine):
        outputs.append({k: float(v) for k, v in engine.state.output.items()})
        if stop_after is not None and engine.state.iteration == stop_after:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    workflow.run()
    return outputs, workflow


@pytest.mark.parametrize(
    ("config", "kind"),
    [("train.json", "train"), ("inference.json", "infer")],
)
def test_properties(config, kind, scans, tmp_path):
    # bundle_root in tmp_path: initialising resolves the fingerprint, which is written beside the model
    workflow = _workflow([CONFIGS / config], kind, bundle_root=str(tmp_path), dataset_dir=str(scans))
    assert workflow.check_properties() == []


@pytest.mark.slow
def test_spark_and_anatomask_modes(tmp_path, scans):
    spark, workflow = _train(
        tmp_path / "spark", scans, method_configs=[CONFIGS / "train_spark.json"], max_epochs=1
    )
    assert type(workflow.parser.get_parsed_content("train#iteration").masking) is RandomMasking
    assert len(spark) == 2
    assert all(o["num_hard"] == 0 for o in spark)
    # the EMA teacher is trained and reported alongside SparK too (the iteration's own reference)
    assert [o["ema_momentum"] for o in spark] == [workflow.parser["ema_momentum_start"]] * 2
    # constant r_t = 0.5: the teacher chooses floor(n_masked / 2) patches in every iteration
    anatomask, workflow = _train(
        tmp_path / "anatomask", scans, max_epochs=1, hard_ratio_start=0.5, hard_ratio_end=0.5
    )
    assert type(workflow.parser.get_parsed_content("train#iteration").masking) is TeacherReconstructionMasking
    model = workflow.parser.get_parsed_content("network")
    n_patches = model.num_patches(workflow.parser["roi_size"])
    n_masked = n_patches - round(n_patches * 0.4)
    assert [o["num_hard"] for o in anatomask] == [n_masked // 2] * 2
    assert all(torch.isfinite(torch.tensor(o["loss"])) for o in anatomask)

    encoder = torch.load(tmp_path / "anatomask" / "models" / "encoder.pt", weights_only=True)
    flat = torch.load(tmp_path / "anatomask" / "models" / "model.pt", weights_only=True)
    assert set(flat) == set(model.state_dict())  # flat, loadable as network_def
    assert all(k.startswith("conv_blocks_context.") for k in encoder)
    for key, value in encoder.items():
        assert torch.equal(value, flat["sparse_encoder.sp_cnn." + key])


@pytest.mark.slow
def test_resume_gives_identical_training(tmp_path, scans):
    overrides = {"max_epochs": 2, "hard_ratio_start": 0.5, "hard_ratio_end": 0.5, "save_every_iterations": 1}
    straight, _ = _train(tmp_path / "straight", scans, **overrides)
    assert len(straight) == 4
    for stop in (2, 3):  # at an epoch boundary and in the middle of an epoch
        root = tmp_path / f"resumed_{stop}"
        first, _ = _train(root, scans, stop_after=stop, **overrides)
        second, _ = _train(root, scans, **overrides)
        assert [o["loss"] for o in first + second] == [o["loss"] for o in straight]
        for name in ("checkpoint_4.pt",):
            a = torch.load(tmp_path / "straight" / "runs" / "checkpoints" / name, weights_only=True)
            b = torch.load(root / "runs" / "checkpoints" / name, weights_only=True)
            for part in ("student", "teacher"):
                sa = a[part] if part == "student" else a[part]["teacher"]
                sb = b[part] if part == "student" else b[part]["teacher"]
                assert all(torch.equal(sa[k], sb[k]) for k in sa), part


@pytest.mark.slow
def test_inference_writes_maps_on_the_image_grid(tmp_path, scans):
    _train(tmp_path, scans, max_epochs=1)
    workflow = _workflow(
        [CONFIGS / "inference.json", SMALL], "infer", bundle_root=str(tmp_path), dataset_dir=str(scans)
    )
    workflow.run()
    roi = workflow.parser["roi_size"]
    for scan in sorted(scans.glob("*.nii.gz")):
        stem = scan.name[: -len(".nii.gz")]
        images = {
            k: nib.load(tmp_path / "eval" / f"{stem}_{k}.nii.gz")
            for k in ("masked", "reconstruction", "scores")
        }
        for image in images.values():
            assert list(image.shape) == roi
            assert (image.affine == images["masked"].affine).all()
        # a centre crop of a RAS 1.5 mm scan: same axes and spacing as the source
        assert abs(images["masked"].affine[:3, :3] - nib.load(scan).affine[:3, :3]).max() < 1e-5
        patch = workflow.parser.get_parsed_content("network").patch_size
        masked = patchify(torch.as_tensor(images["masked"].get_fdata())[None, None], patch)[0]
        scores = patchify(torch.as_tensor(images["scores"].get_fdata())[None, None], patch)[0, :, 0]
        n_masked = len(scores) - round(len(scores) * 0.4)
        blank = (masked == 0).all(dim=1)
        assert int(blank.sum()) == n_masked
        # the teacher scored the n_masked patches of its random mask; the top half stay masked
        assert int((scores > 0).sum()) == n_masked
        hardest = scores.topk(n_masked // 2).indices
        assert blank[hardest].all()


@pytest.mark.slow
def test_multi_gpu_config_on_two_cpu_processes(tmp_path, scans):
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            json.dumps(configs),
            "--bundle_root",
            str(tmp_path),
            "--dataset_dir",
            str(scans),
            "--max_epochs",
            "1",
            "--batch_size",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # two samples over two ranks: one iteration per rank, one export by rank 0
    assert (tmp_path / "models" / "encoder.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "checkpoints").iterdir()) == ["checkpoint_1.pt"]
