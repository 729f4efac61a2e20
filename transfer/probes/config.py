"""What the two frozen-feature probe stages share: the layers a probe can read per family
and the bad-data policy. Each stage's settings are its own (transfer/svm/config.py,
transfer/knn/config.py); defaults are the reference protocol's values.

Linear SVMs (Goyal et al., ICCV 2019, "Scaling and Benchmarking Self-Supervised Visual
Representation Learning"; code: facebookresearch/fair_self_supervision_benchmark, `tools/svm/`)
and a weighted k-nearest-neighbour check (Wu et al. 2018; DINO's `eval_knn.py`). Where a
value comes from the reference code its file is named beside it.
"""

from __future__ import annotations

from typing import Literal

OnBadData = Literal["error", "skip"]

# Every layer the SVM probe can read in an AlexNet, in network order (features.py taps them).
LAYERS: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")
# The taps of the encoder contract's families (encoders/resnet.py, encoders/vit.py): a
# config naming a layer is checked against every family before the weights are read, and
# against the loaded encoder's own taps after.
RESNET_LAYERS: tuple[str, ...] = ("conv1", "res2", "res3", "res4", "res5", "res5avg")
VIT_LAYERS: tuple[str, ...] = ("cls", "cls4", "cls+avg")
ALL_LAYERS: tuple[str, ...] = tuple(dict.fromkeys(LAYERS + RESNET_LAYERS + VIT_LAYERS))
