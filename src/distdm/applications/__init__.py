"""Applications of attribution: unlearning with synsets, synset privacy, robustness of attributions."""

from .compare import Comparison, Variant, compare_study, matrix_similarity, parse_variants
from .privacy import membership_auc, nearest_real, privacy_metrics
from .unlearn import UnlearnReport, forgetting_table, unlearn, unlearn_report

__all__ = [
    "Comparison",
    "UnlearnReport",
    "Variant",
    "compare_study",
    "forgetting_table",
    "matrix_similarity",
    "membership_auc",
    "nearest_real",
    "parse_variants",
    "privacy_metrics",
    "unlearn",
    "unlearn_report",
]

# data diagnosis, noisy-data detection, transferability (DDM Tables 3, 6, 7)
from .diagnose import Diagnosis, diagnose, validation_split  # noqa: E402
from .noise import Corruption, NoiseReport, corrupted_task, flip_labels, inject_noise, noisy_diagnosis  # noqa: E402
from .transfer import TransferResult, transfer  # noqa: E402

__all__ += [
    "Corruption",
    "Diagnosis",
    "NoiseReport",
    "TransferResult",
    "corrupted_task",
    "diagnose",
    "flip_labels",
    "inject_noise",
    "noisy_diagnosis",
    "transfer",
    "validation_split",
]
