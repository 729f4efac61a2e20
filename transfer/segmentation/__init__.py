"""VOC2012 semantic segmentation transfer with FCN (Table 2, 'Segmentation' column).

Entry points for the CLI: `SegmentationConfig`, `default_name`, `main`. The native backend
is plain torch (`model.py`, `engine.py`); `backend: mmseg` runs the same protocol through
mmsegmentation (`mmseg_backend.py`, needs `make mmseg`).
"""

from .config import SegmentationConfig
from .main import default_name, main

__all__ = ["SegmentationConfig", "default_name", "main"]
