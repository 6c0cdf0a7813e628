"""The MindEye2 model: built from a `MindEyeConfig`, saved as config + safetensors weights.

    model = build_model("paper_1024", device="meta")            # a config name in configs/model/
    model = build_model("tiny", voxels_per_subject={"subj01": 300})
    save_checkpoint(model, "runs/x/checkpoint"); model = load_checkpoint("runs/x/checkpoint")
"""
from mindeye.models.checkpoint import (calibration_units, load_calibration, load_checkpoint, read_checkpoint_config,
                                       save_calibration, save_checkpoint)
from mindeye.models.config import LowLevelConfig, MindEyeConfig, PriorConfig, RetrievalConfig
from mindeye.models.factory import available_configs, build_model, count_parameters, load_config
from mindeye.models.mindeye2 import MindEye2, MindEyeOutput
from mindeye.models.official_import import ImportReport, import_official_checkpoint, import_official_state_dict

__all__ = [
    "ImportReport", "LowLevelConfig", "MindEye2", "MindEyeConfig", "MindEyeOutput", "PriorConfig",
    "RetrievalConfig", "available_configs", "build_model", "calibration_units", "count_parameters",
    "import_official_checkpoint", "import_official_state_dict", "load_calibration", "load_checkpoint", "load_config",
    "read_checkpoint_config", "save_calibration", "save_checkpoint",
]
