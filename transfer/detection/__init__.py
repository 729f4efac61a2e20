"""Fast R-CNN detection transfer on PASCAL VOC2007 (Table 2's Detection column): `train.main`;
`backend: detectron2` runs the same protocol through detectron2 (`detectron2_backend.py`)."""
