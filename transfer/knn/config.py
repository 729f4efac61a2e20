"""Settings of the k-NN probe (Wu et al. 2018; DINO's `eval_knn.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from transfer.probes.config import OnBadData


@dataclass
class KNNConfig:
    """`bench transfer --task knn`: weighted k-NN on L2-normalised frozen features.

    DINO eval_knn.py / Wu et al. 2018: cosine similarity, the k most similar training
    images vote with weight exp(similarity / temperature); for VOC's multi-label task a
    class's score is the summed weight of the neighbours that are positives of it.
    """

    name: str | None = None
    seed: int = 0
    data: str | None = None
    device: str = "auto"
    weights: str | None = None
    weights_format: str | None = None
    arch: str = "caffenet"
    layer: str | None = None  # None = the encoder's: AlexNet pool5, ResNet res5avg, ViT cls
    train_split: str = "trainval"
    test_split: str = "test"
    k: int = 20  # DINO reports 20-NN (and 200, Wu et al.'s choice)
    temperature: float = 0.07
    batch_size: int = 64
    workers: int = 2
    input_size: int | None = None  # None = the encoder's: AlexNet 227, ResNet-50 and ViT 224
    resize_shorter: int | None = 256
    cache_dir: str | None = None
    on_bad_data: OnBadData = "error"
    keep_host_memory: bool = True
    # the encoder's forward pass (features.py): auto = bf16 on a GPU or a CPU with native bf16
    # matmuls, else fp32 (the reference's); recorded in the cache key and the run's settings
    precision: str = "auto"
