"""What the two frozen-feature probe stages (transfer/svm, transfer/knn) share: feature
extraction and its cache (features.py), the SVM solvers (svm.py: the reference's LinearSVC and
the protocol; torch_svm.py and solver.py: the batched exact solver), the k-NN scores (knn.py)
and the stages' common steps (stage.py).

Nothing is imported here: the SVM worker processes only need `transfer.probes.svm` (numpy,
scikit-learn) and start without importing torch.
"""
