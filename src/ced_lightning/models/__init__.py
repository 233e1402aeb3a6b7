"""Models as plain `nn.Module`s: CED students/teachers and timm backbones on log-mel input."""

from ced_lightning.models.ced import CED, CEDConfig, FrontEndConfig, LogMelFrontEnd, average_pieces
from ced_lightning.models.checkpoint import (
    CheckpointLoadError,
    LoadedCheckpoint,
    build_model,
    config_from_state_dict,
    load_ced,
    load_checkpoint,
    load_model,
    model_spec,
    read_state_dict,
    save_ced,
)
from ced_lightning.models.factory import CED_SIZES, InitReport, create_ced, list_ced, load_matching_weights
from ced_lightning.models.int8 import QUANTIZE_CHOICES, apply_quantization, quantize_dynamic_int8
from ced_lightning.models.released import (
    RELEASED,
    ReleasedWeights,
    ReleasedWeightsUnavailable,
    fetch_released,
    list_released,
    resolve_checkpoint,
)
from ced_lightning.models.timm_mel import TimmMelClassifier

__all__ = [
    "CED",
    "CED_SIZES",
    "QUANTIZE_CHOICES",
    "RELEASED",
    "CEDConfig",
    "CheckpointLoadError",
    "FrontEndConfig",
    "InitReport",
    "LoadedCheckpoint",
    "LogMelFrontEnd",
    "ReleasedWeights",
    "ReleasedWeightsUnavailable",
    "TimmMelClassifier",
    "apply_quantization",
    "average_pieces",
    "build_model",
    "config_from_state_dict",
    "create_ced",
    "fetch_released",
    "list_ced",
    "list_released",
    "load_ced",
    "load_checkpoint",
    "load_matching_weights",
    "load_model",
    "model_spec",
    "quantize_dynamic_int8",
    "read_state_dict",
    "resolve_checkpoint",
    "save_ced",
]
