"""Weighted k-nearest-neighbour probe: the "modern quick check" of frozen features.

Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
Sec. 3.4) and DINO's eval_knn.py (facebookresearch/dino, `knn_classifier`): features
L2-normalised, similarity = cosine (dot product), the k most similar training images
retrieved, each voting with weight exp(similarity / T), T = 0.07; a class's score is the sum
of the weights of the neighbours carrying it (DINO: one-hot labels times weights, summed
over the k neighbours, no normalisation). DINO reports k = 20 (and 200, Wu et al.'s k).

VOC is multi-label: a neighbour votes for every class it is a positive of (multi-hot labels
in place of the one-hot ones), so score_c(x) = sum over the k neighbours j of
exp(s_j / T) * y_jc. An image that holds a class only through difficult objects does not
vote for it (its label is 0). Scores are ranked per class and scored with the project's
metric (`benchmark.metrics.classification_ap`: scikit-learn AP, difficult images excluded).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.errors import ConfigError


def knn_scores(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
    chunk: int = 1024,
) -> np.ndarray:
    """(M, C) float64 class scores of the test images (see the module docstring).

    train_features (N, D), train_labels (N, C) in {0, 1}, test_features (M, D). k larger than
    N is clamped to N.
    """
    if k < 1 or not temperature > 0:
        raise ConfigError(f"knn: need k >= 1 and temperature > 0, got k={k}, T={temperature}")
    device = torch.device(device)
    train = F.normalize(torch.as_tensor(train_features, dtype=torch.float32).to(device), dim=1)
    labels = torch.as_tensor(np.asarray(train_labels) > 0, dtype=torch.float32).to(device)
    test = torch.as_tensor(test_features, dtype=torch.float32)
    k = min(k, train.shape[0])
    out = []
    with torch.inference_mode():
        for start in range(0, test.shape[0], chunk):
            q = F.normalize(test[start : start + chunk].to(device), dim=1)
            sim, index = (q @ train.T).topk(k, dim=1)  # (b, k), most similar first
            weights = (sim.double() / temperature).exp()  # exp(s / T) in float64
            votes = labels[index].double()  # (b, k, C) multi-hot
            out.append((weights[:, :, None] * votes).sum(dim=1).cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, labels.shape[1]))
