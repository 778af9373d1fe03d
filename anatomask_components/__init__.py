"""AnatoMask components: sparse STU-Net pretraining for 3D medical segmentation, for MONAI bundles."""

__version__ = "0.1.0"
