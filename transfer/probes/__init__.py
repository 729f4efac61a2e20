"""Frozen-feature probes on VOC2007: Goyal et al.'s linear SVMs (per layer, low-shot) and a
weighted k-NN check.

Entry points for the CLI: `SVMConfig`, `main_svm`, `default_name_svm`; `KNNConfig`,
`main_knn`, `default_name_knn`.
"""

from .config import KNNConfig, SVMConfig
from .train import default_name_knn, default_name_svm, main_knn, main_svm

__all__ = [
    "KNNConfig", "SVMConfig", "default_name_knn", "default_name_svm", "main_knn", "main_svm",
]  # fmt: skip
