"""Networks: STU-Net, its sparse pretraining encoder and the reconstruction decoders."""

from anatomask_components.networks.pretrain import AnatoMaskPretrainModel
from anatomask_components.networks.sparse import SparseSTUNetEncoder
from anatomask_components.networks.stunet import STUNET_PRESETS, BasicResBlock, STUNet, UpsampleNearest

__all__ = [
    "STUNET_PRESETS",
    "AnatoMaskPretrainModel",
    "BasicResBlock",
    "STUNet",
    "SparseSTUNetEncoder",
    "UpsampleNearest",
]
