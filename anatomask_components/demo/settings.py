"""The demo's settings (:class:`DemoSettings`), shared by its stages (:mod:`.pipeline`) and its report
(:mod:`.report`), and :func:`clock`, how both print durations."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FINETUNE_INITS", "DemoSettings", "clock"]

# fine-tuning run name -> the pretraining run whose encoder it starts from (None: random initialisation)
FINETUNE_INITS = {"scratch": None, "spark": "spark", "anatomask": "anatomask"}


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's runs share; the full and quick presets differ in the steps, the crop and
    the fine-tuning runs.

    Args:
        quick: the quick preset (:meth:`preset`).
        seed: seed of every run (network initialisation, crops, masks).
        spacing: voxel size in mm for pretraining and fine-tuning (4 mm: a step costs half of one at 3 mm).
        roi_size: pretraining and fine-tuning crop, also the sliding-window size (80 x 80 x 16 at 4 mm: the
            width of an abdomen in-plane, so that left and right organs are told apart by their context,
            and 64 mm deep; measured against 3 mm crops in docs/finetune.md, "The demo's recipe").
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
            with the full preset of commit c1aca94 (300 iterations, 3 mm) every organ of case C scored
            DSC 0.0; with this preset, from scratch, C's spleen drops from 0.49 to 0.0 for +0.05 aorta
            (docs/finetune.md, "Partially labelled scans").
        finetune_inits: the fine-tuning runs, by initialisation (``"scratch"``, ``"spark"``, ``"anatomask"``:
            random, the SparK run's encoder, the AnatoMask run's encoder); both pretraining runs always run.
        finetune_lr: AdamW learning rate of fine-tuning (paper: 1e-4; 1e-3 here, for the same reason).
        ct_window: CT intensities of every run (pretraining and fine-tuning) clipped to this HU window and
            mapped to [-2, 2] (:func:`~anatomask_components.data.fingerprint.window_fingerprint`); None: the
            bundles' default, nnU-Net's CT scheme with the pretraining set's fingerprint. A window, because
            three unlabelled scans give a fingerprint that spans lung to bone (-947 .. 696 HU) and the one
            labelled case one that clips at 79 HU (its organs are non-contrast): docs/finetune.md,
            "The demo's recipe", has the measurements.
        augmentation_off: nnU-Net augmentations switched off (probability 0) in fine-tuning: spatial ones
            and those that blur, because in a few hundred iterations on one case they slow fitting more than
            they help (measured: docs/finetune.md); the intensity ones, crops past the border and thin-slab
            crops stay on.
        enhance_prob, enhance_range: the simulated contrast enhancement (``augmentation#enhance_*``, off in
            the bundles), in normalised units: case A is non-contrast, case C portal venous (liver +48 HU,
            aorta +111 HU; one unit is 100 HU in the default window).
        sw_overlap: sliding-window overlap of validation, evaluation and inference (bundle default 0.5).
        analysis_masks: random masks per case in the top-k analysis.
        progress_every: iterations between progress lines.
    """

    quick: bool = False
    seed: int = 0
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    roi_size: tuple[int, int, int] = (80, 80, 16)
    depths: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
    dims: tuple[int, ...] = (16, 32, 64, 128, 128, 128)
    mask_ratio: float = 0.6
    hard_ratio_end: float = 0.5
    pretrain_epochs: int = 30
    pretrain_warmup_epochs: int = 2
    save_every_epochs: int = 10
    ema_momentum: tuple[float, float] = (0.98, 0.99)
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 16
    iterations_per_epoch: int = 25
    val_interval: int = 8
    finetune_lr: float = 1e-3
    finetune_inits: tuple[str, ...] = tuple(FINETUNE_INITS)
    partial_case_b: bool = False
    ct_window: tuple[float, float] | None = (-160.0, 240.0)
    augmentation_off: tuple[str, ...] = (
        "rotate_prob",
        "scale_prob",
        "flip_prob",
        "blur_prob",
        "lowres_prob",
        "gamma_inverted_prob",
    )
    enhance_prob: float = 0.3
    enhance_range: tuple[float, float] = (0.0, 1.2)
    curve_every_epochs: int = 2
    sw_overlap: float = 0.5
    analysis_masks: int = 4
    progress_every: int = 10

    @classmethod
    def preset(cls, quick: bool = False, seed: int = 0) -> DemoSettings:
        """The full demo (400 fine-tuning iterations per initialisation) or the quick one, which runs every
        kind of stage and the whole report in under 5 minutes on a 2-core CPU: fewer steps and analysis masks
        (100 fine-tuning iterations), 64 x 64 x 16 crops (a step costs 0.52 s against 0.74 s), and two
        fine-tuning runs, from scratch and from AnatoMask's encoder (SparK's encoder is still pretrained and
        analysed, not fine-tuned)."""
        if not quick:
            return cls(seed=seed)
        return cls(
            quick=True,
            seed=seed,
            pretrain_epochs=5,
            pretrain_warmup_epochs=1,
            save_every_epochs=5,
            roi_size=(64, 64, 16),
            finetune_inits=("scratch", "anatomask"),
            finetune_epochs=4,
            iterations_per_epoch=25,
            curve_every_epochs=2,
            val_interval=4,
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
