"""`bench transfer --task knn`: weighted k-NN on frozen features (Wu et al. 2018, DINO's
eval_knn), on VOC2007 (the feature extraction is transfer/probes/)."""
