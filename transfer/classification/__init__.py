"""VOC2007 classification transfer (Table 2, 'Classification' column).

Entry points for the CLI: `ClassificationConfig`, `default_name`, `main`.
"""

from .config import AugmentConfig, ClassificationConfig, EvalConfig, TrainConfig
from .train import default_name, main

__all__ = [
    "AugmentConfig", "ClassificationConfig", "EvalConfig", "TrainConfig", "default_name", "main",
]  # fmt: skip
