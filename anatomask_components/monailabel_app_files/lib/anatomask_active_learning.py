"""Active learning on AnatoMask reconstruction difficulty, for MONAI Label 0.8.5.

Written into the app by ``anatomask export-monailabel-app``. It runs without ``anatomask_components``
installed: the scorer comes from the pretraining bundle the app holds, whose ``scripts/anatomask_components``
is the package's code as ``anatomask export-bundle`` exports it.

Scoring method ``anatomask_difficulty`` (:class:`DifficultyScoring`) scores every unlabelled image with
``scripts.anatomask_components.difficulty.DifficultyScorer`` and stores the result in the image's info in the
datastore, under ``anatomask_difficulty``::

    {"score": mean masked-reconstruction error over the body patches (higher: harder),
     "quantile": their 0.9 quantile, "model_digest": sha256 of the weights file scored with,
     "weights": which network of it, "flags": [warnings about the scan], "seconds": time taken,
     "ts": when it was stored (unix time, s)}

or ``{"error": message naming the file, "model_digest", "ts"}`` for a scan the scorer cannot read. An image
whose info already holds a result for the same ``model_digest`` is skipped, so a repeated call scores only
new images, or all of them after the weights changed.

Strategy ``anatomask_hardest`` (:class:`HardestFirst`) returns the unlabelled image with the highest score
among those scored with the current weights (the digest of the newest stored result); ties go to the smaller
id. Unlabelled images without such a score (added since the last scoring, scored with other weights, or
unreadable) come after every scored one, the least recently served first, so that the strategy still hands
out every image. Until an annotator saves a final label for it, the hardest image is served again.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.utils.others.class_utils import unload_module

logger = logging.getLogger(__name__)

DIFFICULTY = "anatomask_difficulty"
HARDEST = "anatomask_hardest"
SCORER_MODULE = "scripts.anatomask_components.difficulty"


@contextmanager
def bundle_on_path(bundle_dir: str) -> Iterator[None]:
    """The bundle's ``scripts`` package importable while inside, as MONAI Label's bundle tasks arrange it
    (another bundle's ``scripts`` may be loaded: it is unloaded first)."""
    sys.path.insert(0, bundle_dir)
    unload_module("scripts")
    try:
        yield
    finally:
        sys.path.remove(bundle_dir)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def rank_hardest(
    infos: Mapping[str, Mapping[str, Any]], key: str = DIFFICULTY, strategy: str = HARDEST
) -> list[str]:
    """Image ids in the order :class:`HardestFirst` serves them (see the module docstring).

    Args:
        infos: image id -> image info as the datastore holds it.
        key: where the scoring method stores its results.
        strategy: the strategy's name, under which MONAI Label records when it served an image.

    Returns:
        every id of ``infos``: the scored ones by decreasing score, then the others, least recently served
        first.
    """
    results = {i: info[key] for i, info in infos.items() if isinstance(info.get(key), Mapping)}
    stamped = [r for r in results.values() if r.get("model_digest") and _finite(r.get("ts"))]
    current = max(stamped, key=lambda r: r["ts"])["model_digest"] if stamped else None
    scored = [i for i, r in results.items() if current and r.get("model_digest") == current]
    scored = [i for i in scored if _finite(results[i].get("score"))]
    scored.sort(key=lambda i: (-results[i]["score"], i))

    def served_at(image_id: str) -> float:
        served = infos[image_id].get("strategy", {}).get(strategy, {})
        return served.get("ts", 0) if isinstance(served, Mapping) else 0

    ranked = set(scored)
    rest = sorted((i for i in infos if i not in ranked), key=lambda i: (served_at(i), i))
    return scored + rest


class DifficultyScoring(ScoringMethod):
    """Scoring method ``anatomask_difficulty``: reconstruction difficulty of every unlabelled image.

    Args:
        bundle_dir: the pretraining bundle (``model/anatomask_pretrain`` of the app).
        weights: ``"teacher"`` (the EMA teacher of the bundle's newest training checkpoint; an exported
            bundle has none and falls back to the student ``models/model.pt``), ``"student"``, or a weights
            file.
        num_masks: random masks per window.
        batch_size: windows per forward pass.
        device: torch device; None: CUDA when available.
        max_samples: score at most this many images per call (0: all).

    A request (``POST /scoring/anatomask_difficulty`` with a JSON body) may set ``weights``, ``num_masks``,
    ``batch_size``, ``device`` and ``max_samples`` for that call.
    """

    def __init__(
        self,
        bundle_dir: str,
        weights: str = "teacher",
        num_masks: int = 4,
        batch_size: int = 2,
        device: str | None = None,
        max_samples: int = 0,
    ) -> None:
        super().__init__(
            "AnatoMask reconstruction difficulty of every unlabelled image: the pretrained network's error "
            "on masked patches (higher: harder)"
        )
        self.bundle_dir = bundle_dir
        self.options = {
            "weights": weights,
            "num_masks": num_masks,
            "batch_size": batch_size,
            "device": device,
        }
        self.max_samples = max_samples

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        started = time.time()
        options = {name: request.get(name, default) for name, default in self.options.items()}
        max_samples = int(request.get("max_samples", self.max_samples))
        with bundle_on_path(self.bundle_dir):
            difficulty = importlib.import_module(SCORER_MODULE)
            scorer = difficulty.DifficultyScorer(self.bundle_dir, **options)
            digest = scorer.model_digest
            unlabeled = datastore.get_unlabeled_images()
            todo = []
            for image_id in unlabeled:
                previous = datastore.get_image_info(image_id).get(DIFFICULTY)
                if not (isinstance(previous, Mapping) and previous.get("model_digest") == digest):
                    todo.append(image_id)
            skipped = len(unlabeled) - len(todo)
            todo = todo[:max_samples] if max_samples > 0 else todo
            logger.info(
                f"{DIFFICULTY}: {len(unlabeled)} unlabelled, {skipped} already scored with {digest[:12]}, "
                f"scoring {len(todo)} with {scorer.weights_source}"
            )
            failed = 0
            for image_id in todo:
                try:
                    result = scorer.score_file(datastore.get_image_uri(image_id))
                except difficulty.InvalidScanError as error:  # its message names the file and the problem
                    failed += 1
                    logger.warning(f"{DIFFICULTY}: {image_id}: {error}")
                    entry = {"error": str(error), "model_digest": digest, "ts": round(time.time(), 3)}
                else:
                    entry = {
                        "score": result.score if math.isfinite(result.score) else None,
                        "quantile": result.quantile if math.isfinite(result.quantile) else None,
                        "model_digest": digest,
                        "weights": scorer.weights_source,
                        "flags": list(result.flags),
                        "seconds": round(result.seconds, 3),
                        "ts": round(time.time(), 3),
                    }
                    logger.info(
                        f"{DIFFICULTY}: {image_id}: score {result.score:.6g} in {result.seconds:.1f} s"
                    )
                # the server may have written the datastore file meanwhile (labels, served times): keep that
                datastore.refresh()
                datastore.update_image_info(image_id, {DIFFICULTY: entry})
        summary = {
            "total": len(unlabeled),
            "skipped": skipped,
            "executed": len(todo),
            "failed": failed,
            "model_digest": digest,
            "latency": round(time.time() - started, 3),
        }
        logger.info(f"{DIFFICULTY}: {summary}")
        return summary


class HardestFirst(Strategy):
    """Strategy ``anatomask_hardest``: the unlabelled image with the highest ``anatomask_difficulty`` score
    (see :func:`rank_hardest`)."""

    def __init__(self) -> None:
        super().__init__(
            f"Unlabelled image with the highest AnatoMask reconstruction difficulty (run the {DIFFICULTY} "
            "scoring method first; unscored images come last)"
        )

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        # Scores are written by the scoring process into the datastore file; without MONAI Label's file
        # watcher (MONAI_LABEL_DATASTORE_AUTO_RELOAD=false) this process would not see them otherwise.
        datastore.refresh()
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        order = rank_hardest({i: datastore.get_image_info(i) for i in images}, strategy=request["strategy"])
        chosen = order[0]
        result = datastore.get_image_info(chosen).get(DIFFICULTY)
        score = result.get("score") if isinstance(result, Mapping) else None
        logger.info(f"{HARDEST}: selected {chosen} (score {score}) of {len(images)} unlabelled")
        return {"id": chosen, "score": score}
