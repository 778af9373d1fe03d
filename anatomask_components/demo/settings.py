"""The demo's settings (:class:`DemoSettings`), shared by its stages (:mod:`.pipeline`) and its report
(:mod:`.report`), and :func:`clock`, how both print durations."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DemoSettings", "clock"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's runs share; the full and quick presets differ only in the number of steps.

    Args:
        quick: the quick preset (fewer steps, same stages).
        seed: seed of every run (network initialisation, crops, masks).
        spacing: voxel size in mm for pretraining and fine-tuning (3 mm: case A's native grid).
        roi_size: pretraining and fine-tuning crop, also the sliding-window size (96 x 96 x 32 at 3 mm: the
            width of an abdomen in-plane, so that left and right organs are told apart by their context).
        depths, dims: the small STU-Net (six stages, default TotalSegmentator strides; the pretraining
            encoder is its first five stages, total stride 16, so the mask unit is 16^3 voxels).
        mask_ratio: masked fraction of patches (paper: 0.6).
        hard_ratio_end: r_T (paper: 0.5).
        pretrain_epochs: pretraining epochs; one epoch is one pass over the 3 unlabelled CT at batch 1.
        pretrain_warmup_epochs: linear learning-rate warm-up.
        save_every_epochs: pretraining checkpoint interval (divides ``pretrain_epochs``).
        ema_momentum: teacher EMA momentum, start and end of the first quarter (paper: 0.999 -> 0.9999,
            scaled here because the demo runs hundreds of steps, not hundreds of thousands).
        pretrain_lr: AdamW learning rate of pretraining (paper: 1e-4 for ~300k iterations; 1e-3 here so
            that a few hundred iterations learn visibly).
        finetune_epochs, iterations_per_epoch, val_interval: fine-tuning length and validation interval; a
            a checkpoint is kept every ``curve_every_epochs`` for the DSC-against-iterations curve on case C.
        partial_case_b: fine-tune on case B's aorta too (the examples' ``flare22_partial.json``): a
            contrast-enhanced CT angiography whose other organs are unlabelled and kept out of the loss. Off:
            with the full preset's 300 iterations it took half of them from case A and every organ of case C
            scored DSC 0.0 (A alone: see docs/finetune.md, "Partially labelled scans").
        finetune_lr: AdamW learning rate of fine-tuning (paper: 1e-4; 1e-3 here, for the same reason).
        enhance_prob: probability of the simulated contrast enhancement (``augmentation#enhance_prob``, off
            in the bundles): case A is non-contrast, case C portal venous.
        sw_overlap: sliding-window overlap of validation, evaluation and inference (bundle default 0.5).
        analysis_masks: random masks per case in the top-k analysis.
        progress_every: iterations between progress lines.
    """

    quick: bool = False
    seed: int = 0
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (96, 96, 32)
    depths: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
    dims: tuple[int, ...] = (16, 32, 64, 128, 128, 128)
    mask_ratio: float = 0.6
    hard_ratio_end: float = 0.5
    pretrain_epochs: int = 30
    pretrain_warmup_epochs: int = 2
    save_every_epochs: int = 10
    ema_momentum: tuple[float, float] = (0.98, 0.99)
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 12
    iterations_per_epoch: int = 25
    val_interval: int = 4
    finetune_lr: float = 1e-3
    partial_case_b: bool = False
    enhance_prob: float = 0.3
    curve_every_epochs: int = 2
    sw_overlap: float = 0.5
    analysis_masks: int = 4
    progress_every: int = 10

    @classmethod
    def preset(cls, quick: bool = False, seed: int = 0) -> DemoSettings:
        """The full demo (about 24 minutes on 2 CPU cores) or the quick one: the same stages and report
        with fewer steps, a 4 mm grid, a smaller crop and fewer analysis masks, for about 4 to 7 minutes
        (its 60 fine-tuning iterations do not yet segment case C)."""
        if not quick:
            return cls(seed=seed)
        return cls(
            quick=True,
            seed=seed,
            roi_size=(64, 64, 32),
            pretrain_epochs=5,
            pretrain_warmup_epochs=1,
            save_every_epochs=5,
            finetune_epochs=3,
            iterations_per_epoch=20,
            curve_every_epochs=1,
            val_interval=3,
            spacing=(4.0, 4.0, 4.0),
            sw_overlap=0.25,
            analysis_masks=1,
            progress_every=5,
        )

    @property
    def pretrain_iterations(self) -> int:
        return self.pretrain_epochs * 3

    @property
    def finetune_iterations(self) -> int:
        return self.finetune_epochs * self.iterations_per_epoch


def clock(seconds: float) -> str:
    """``m:ss`` of a duration in seconds (minutes beyond 59 are not carried into hours)."""
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
