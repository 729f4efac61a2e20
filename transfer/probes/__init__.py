"""Frozen-feature probes on VOC2007: Goyal et al.'s linear SVMs (per layer, low-shot) and a
weighted k-NN check.

Entry points for the CLI: `SVMConfig`, `main_svm`, `default_name_svm`; `KNNConfig`,
`main_knn`, `default_name_knn`. They are imported lazily, so that the SVM worker processes,
which only need `transfer.probes.svm` (numpy, scikit-learn), start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import KNNConfig, SVMConfig
    from .train import default_name_knn, default_name_svm, main_knn, main_svm

__all__ = [
    "KNNConfig", "SVMConfig", "default_name_knn", "default_name_svm", "main_knn", "main_svm",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in ("KNNConfig", "SVMConfig"):
        from . import config

        return getattr(config, name)
    if name in __all__:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
