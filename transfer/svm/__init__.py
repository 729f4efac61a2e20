"""`bench transfer --task svm`: Goyal et al.'s linear SVMs per layer and low-shot on VOC2007
(the solvers and the feature extraction are transfer/probes/)."""
