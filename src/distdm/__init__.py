"""distdm: training data attribution with distilled datamodels, exact retraining and influence functions."""

from .attribution import ATTRIBUTORS, Attributor, make_attributor
from .clusters import Clusters, classwise, index_order, kmeans_per_class, penultimate_features
from .config import ClusterConfig, DistillConfig, OnlineConfig, TrainConfig
from .data import TensorData, from_dataset, from_tensors, load_dataset
from .engine import Schedule, predict, train_variants
from .errors import DistdmError
from .models import build_model
from .scores import SIGN_CONVENTION, Scores
from .task import Task, train_target

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
    "Schedule",
    "Scores",
    "Task",
    "TensorData",
    "TrainConfig",
    "build_model",
    "classwise",
    "from_dataset",
    "from_tensors",
    "index_order",
    "kmeans_per_class",
    "load_dataset",
    "make_attributor",
    "penultimate_features",
    "predict",
    "train_target",
    "train_variants",
]
