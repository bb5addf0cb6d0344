"""distdm: training data attribution with distilled datamodels, exact retraining and influence functions."""

from .attribution import ATTRIBUTORS, Attributor, make_attributor
from .clusters import Clusters, classwise, index_order, kmeans_per_class, penultimate_features
from .config import ClusterConfig, DistillConfig, OnlineConfig, TrainConfig
from .data import TensorData, from_dataset, from_tensors, load_dataset
from .engine import Schedule, available_devices, predict, resolve_device, train_variants
from .errors import DistdmError
from .models import build_model
from .pack import Pack, export_pack, load_pack
from .presets import PRESETS, preset
from .run import Run
from .runtime import Runtime
from .scores import SIGN_CONVENTION, Scores, TopUnits
from .task import Task, train_target
from .userdata import load_data_file, load_model_spec
from .verify import Verification, verify

__version__ = "0.1.0"

__all__ = [
    "ATTRIBUTORS",
    "SIGN_CONVENTION",
    "Attributor",
    "ClusterConfig",
    "Clusters",
    "DistdmError",
    "DistillConfig",
    "OnlineConfig",
    "PRESETS",
    "Pack",
    "Run",
    "Runtime",
    "Schedule",
    "Scores",
    "Task",
    "TopUnits",
    "TensorData",
    "TrainConfig",
    "Verification",
    "available_devices",
    "build_model",
    "classwise",
    "export_pack",
    "from_dataset",
    "from_tensors",
    "index_order",
    "kmeans_per_class",
    "load_data_file",
    "load_dataset",
    "load_pack",
    "load_model_spec",
    "make_attributor",
    "penultimate_features",
    "predict",
    "preset",
    "resolve_device",
    "train_target",
    "train_variants",
    "verify",
]
