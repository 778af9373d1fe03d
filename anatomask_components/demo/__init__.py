"""The end-to-end demo on real CT (``make demo``, ``anatomask demo``).

Unlabelled CT in, two pretrained backbones (SparK's random masking and AnatoMask), three fine-tuned
FLARE22 segmenters (from scratch, from each encoder; the quick demo skips SparK's), their evaluation and
inference on an unseen DICOM series, and a report with pictures. Every training, evaluation and inference
step runs a copy of a bundle of this repository with ``python -m monai.bundle run`` and a demo override
config, so each run leaves a bundle folder that works on its own.

- :mod:`~anatomask_components.demo.settings`: the settings the stages and the report share;
- :mod:`~anatomask_components.demo.pipeline`: the stages and the bundle runs;
- :mod:`~anatomask_components.demo.bundle_process`: each bundle run forked from one preloaded interpreter;
- :mod:`~anatomask_components.demo.analysis`: what the teacher finds hard (top-k statistics, figure data);
- :mod:`~anatomask_components.demo.report`: the figures and ``report.html`` / ``report.md``.
"""

from anatomask_components.demo.pipeline import run_demo
from anatomask_components.demo.settings import DemoSettings

__all__ = ["DemoSettings", "run_demo"]
