"""Networks: STU-Net, the sparse pretraining encoder of any CNN, the reconstruction decoders and a ViT MAE."""

from anatomask_components.networks.contract import (
    FineTuningContract,
    PretrainingBackbone,
    PretrainingNetwork,
    fine_tuning_contract,
    register_fine_tuning_contract,
)
from anatomask_components.networks.pretrain import AnatoMaskPretrainModel
from anatomask_components.networks.sparse import SparseEncoder, register_sparse_rule
from anatomask_components.networks.stunet import STUNET_PRESETS, BasicResBlock, STUNet, UpsampleNearest
from anatomask_components.networks.vit import MAEPretrainModel

__all__ = [
    "STUNET_PRESETS",
    "AnatoMaskPretrainModel",
    "BasicResBlock",
    "FineTuningContract",
    "MAEPretrainModel",
    "PretrainingBackbone",
    "PretrainingNetwork",
    "STUNet",
    "SparseEncoder",
    "UpsampleNearest",
    "fine_tuning_contract",
    "register_fine_tuning_contract",
    "register_sparse_rule",
]
