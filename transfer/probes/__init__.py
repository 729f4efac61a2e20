"""Frozen-feature probes on VOC2007: Goyal et al.'s linear SVMs (per layer, low-shot) and a
weighted k-NN check (`train.main_svm`, `train.main_knn`).

Nothing is imported here: the SVM worker processes only need `transfer.probes.svm` (numpy,
scikit-learn) and start without importing torch.
"""
