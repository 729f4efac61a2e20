"""VOC2012 semantic segmentation transfer with FCN (Table 2, 'Segmentation' column).

The native backend is plain torch (`model.py`, `train.py`, `evaluate.py`); `backend: mmseg`
runs the same protocol through mmsegmentation (`mmseg_backend.py`, needs `make mmseg`).
"""
