"""AnatoMask app for MONAI Label 0.8.5, written by ``anatomask export-monailabel-app``.

Layout::

    main.py                             this app
    lib/anatomask_active_learning.py    the scoring method and the strategy
    model/anatomask_pretrain/           exported pretraining bundle: the difficulty scorer
    model/<fine-tuning bundle>/         exported fine-tuning bundles, if any (infer and train)

Everything the bundles need travels in their ``scripts/`` folders: the server's environment needs MONAI Label,
not ``anatomask_components``. Start it with::

    python -m monailabel.main start_server --app <this folder> --studies <images> [--conf models a,b]

``--conf`` options: ``models`` (fine-tuning bundles to serve, comma-separated; default: every bundle folder in
``model/`` but the pretraining one), ``skip_trainers`` (true: inference only), ``difficulty_weights``
(teacher, student or a weights file), ``difficulty_num_masks``, ``difficulty_batch_size``,
``difficulty_device``, ``difficulty_max_samples``.

Active learning: strategies ``anatomask_hardest`` (highest reconstruction difficulty first), ``random`` and
``first`` (MONAI Label's); scoring method ``anatomask_difficulty``. See lib/anatomask_active_learning.py.
"""

from __future__ import annotations

import logging
import os

from lib.anatomask_active_learning import DIFFICULTY, HARDEST, DifficultyScoring, HardestFirst
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

PRETRAIN = "anatomask_pretrain"


class AnatoMaskApp(MONAILabelApp):
    """Fine-tuning bundles for segmentation (as MONAI Label's monaibundle app serves them) and active learning
    on the pretraining bundle's reconstruction difficulty."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        model_dir = os.path.join(app_dir, "model")
        self.pretrain_dir = os.path.join(model_dir, PRETRAIN)
        if not os.path.isfile(os.path.join(self.pretrain_dir, "configs", "inference.json")):
            raise FileNotFoundError(
                f"{self.pretrain_dir}: no pretraining bundle (configs/inference.json); write the app with "
                "anatomask export-monailabel-app"
            )
        names = [n.strip() for n in conf.get("models", "").split(",") if n.strip()]
        if not names:
            names = sorted(
                n
                for n in os.listdir(model_dir)
                if n != PRETRAIN and os.path.isfile(os.path.join(model_dir, n, "configs", "inference.json"))
            )
        missing = [n for n in names if not os.path.isdir(os.path.join(model_dir, n))]
        if missing:
            raise FileNotFoundError(f"{model_dir}: no bundle folder {', '.join(missing)} (--conf models)")
        self.models = {n: os.path.join(model_dir, n) for n in names}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="AnatoMask",
            description="AnatoMask fine-tuned STU-Nets, and active learning on reconstruction difficulty",
            version="1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.models.items():
            infers[name] = BundleInferTask(path, self.conf)
            logger.info(f"+++ Adding Inferer:: {name} => {path}")
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name, path in self.models.items():
            task = BundleTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
                logger.info(f"+++ Adding Trainer:: {name} => {path}")
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {HARDEST: HardestFirst(), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        device = self.conf.get("difficulty_device")
        return {
            DIFFICULTY: DifficultyScoring(
                self.pretrain_dir,
                weights=self.conf.get("difficulty_weights", "teacher"),
                num_masks=int(self.conf.get("difficulty_num_masks", "4")),
                batch_size=int(self.conf.get("difficulty_batch_size", "2")),
                device=device if device else None,
                max_samples=int(self.conf.get("difficulty_max_samples", "0")),
            )
        }
