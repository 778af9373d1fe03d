"""Data layer: real scans in, clean volumes out.

- :mod:`~anatomask_components.data.readers`: ``AnatoMaskReader`` (NIfTI, NRRD, MHA/MHD, DICOM series; RAS).
- :mod:`~anatomask_components.data.preprocessing`: the shared pretraining / fine-tuning / inference pipelines.
- :mod:`~anatomask_components.data.datasets`: on-disk cache of the deterministic part, bad-scan skipping.
- :mod:`~anatomask_components.data.cache`: where that cache lives (one per machine), its usage and pruning
  (``anatomask cache``).
- :mod:`~anatomask_components.data.preprocess`: filling the cache ahead of training
  (``anatomask preprocess``).
- :mod:`~anatomask_components.data.datalists`: datalists from folders, nnU-Net, MSD and AutoPET layouts.
- :mod:`~anatomask_components.data.labels`: label sets and remapping (TotalSegmentator to FLARE22 / AMOS22).
- :mod:`~anatomask_components.data.partial_labels`: partially labelled training scans (the ``labelled``
  field, the unlabelled codes in their label maps).
- :mod:`~anatomask_components.data.normalization`, :mod:`~anatomask_components.data.fingerprint`: intensities.
- :mod:`~anatomask_components.data.validation`: ``InvalidScanError`` and the checks behind it.
- :mod:`~anatomask_components.data.checks`: ``check_datalist`` (``anatomask check-data``), datalist reading.
- :mod:`~anatomask_components.data.phantoms`, :mod:`~anatomask_components.data.writers`: synthetic test data.
- :mod:`~anatomask_components.data.examples`: the real example CT (``anatomask fetch-examples``).

Submodules are imported on use, so that importing the package stays cheap. They build bottom-up, without
cycles: validation; readers, writers, partial_labels; labels, normalization, datalists; preprocessing;
checks, fingerprint, cache, datasets, examples and phantoms on top, preprocess last
(tests/data/test_data_layers.py keeps it so).
"""
