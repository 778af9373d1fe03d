"""Networks: STU-Net, its sparse pretraining encoder, the reconstruction decoders and a ViT MAE."""

from anatomask_components.networks.contract import (
    FineTuningContract,
    PretrainingNetwork,
    fine_tuning_contract,
    register_fine_tuning_contract,
)
from anatomask_components.networks.pretrain import AnatoMaskPretrainModel
from anatomask_components.networks.sparse import SparseSTUNetEncoder
from anatomask_components.networks.stunet import STUNET_PRESETS, BasicResBlock, STUNet, UpsampleNearest
from anatomask_components.networks.vit import MAEPretrainModel

__all__ = [
    "STUNET_PRESETS",
    "AnatoMaskPretrainModel",
    "BasicResBlock",
    "FineTuningContract",
    "MAEPretrainModel",
    "PretrainingNetwork",
    "STUNet",
    "SparseSTUNetEncoder",
    "UpsampleNearest",
    "fine_tuning_contract",
    "register_fine_tuning_contract",
]
