"""Settings of the SVM probe; defaults are the reference protocol's values.

Linear SVMs (Goyal et al., ICCV 2019, "Scaling and Benchmarking Self-Supervised Visual
Representation Learning"; code: facebookresearch/fair_self_supervision_benchmark, `tools/svm/`).
Where a value comes from the reference code its file is named beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transfer.probes.config import OnBadData

APKind = Literal["reference", "sklearn"]
TrainDifficult = Literal["negative", "ignore"]

# tools/svm/svm_helper.py `parse_cost_list`: the costs given on the command line (the
# `--costs_list` of GETTING_STARTED.md's VOC07 commands) followed by 0.5**4 ... 0.5**19.
# Order matters: the first cost with the highest cross-validation AP wins (np.argmax).
COMMAND_LINE_COSTS: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
REFERENCE_COSTS: tuple[float, ...] = COMMAND_LINE_COSTS + tuple(0.5**n for n in range(4, 20))

# extra_scripts/create_voc_low_shot_samples.py: k values and 5 independent samples.
LOW_SHOT_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)
LOW_SHOT_DRAWS = 5


@dataclass
class SVMConfig:
    """`bench transfer --task svm`: one-vs-all linear SVMs on frozen, pooled features.

    Reference LinearSVC (tools/svm/train_svm_kfold.py): squared hinge, L2 penalty, dual
    solver, class_weight {1: 2, -1: 1}, intercept with intercept_scaling 1, tol 1e-4,
    max_iter 2000, on L2-normalised features; cost by 3-fold cross-validated AP.
    """

    name: str | None = None
    seed: int = 0  # random init of the encoder (weights: None), liblinear's seed, low-shot draws
    data: str | None = None  # VOCdevkit or VOC2007 folder; None = embedded synthetic data
    device: str = "auto"
    weights: str | None = None  # run folder, .safetensors, a ResNet/ViT checkpoint; None = random
    weights_format: str | None = None  # a checkpoint's layout (weights/formats.py); None = detect
    arch: str = "caffenet"  # architecture of the random baseline (files carry their own)
    # None = every layer the encoder offers: AlexNet conv1-conv5, pool5; ResNet conv1,
    # res2-res5, res5avg; ViT cls, cls4, cls+avg
    layers: tuple[str, ...] | None = None
    train_split: str = "trainval"
    test_split: str = "test"
    costs: tuple[float, ...] = REFERENCE_COSTS
    folds: int = 3  # cross_val_score(cv=3): StratifiedKFold(3), no shuffling
    positive_weight: float = 2.0  # class_weight={1: 2, -1: 1}
    max_iter: int = 2000
    tol: float = 1e-4
    # The reference trains on trainval with difficult-only images as negatives (their
    # target -1 becomes the SVM label -1) and leaves them out of the test AP; "ignore"
    # leaves them out of training too.
    train_difficult: TrainDifficult = "negative"
    ap: APKind = "reference"  # which AP is `map`: test_svm.py's, or scikit-learn's
    low_shot: bool = True
    low_shot_sizes: tuple[int, ...] = LOW_SHOT_SIZES
    low_shot_draws: int = LOW_SHOT_DRAWS
    low_shot_layers: tuple[str, ...] | None = None  # None = every layer in `layers`
    low_shot_negatives: int | None = None  # negatives per positive; None = classes - 1 (19)
    # "torch": every class, cost and fold of a layer solved together (solver.py, on
    # `device`, the same optimum as LinearSVC's); "liblinear": scikit-learn's LinearSVC one
    # problem at a time in n_jobs processes, as the reference runs it.
    svm_solver: str = "torch"
    n_jobs: int = 2  # liblinear: processes fitting (class, cost) problems at once; -1 = all
    batch_size: int = 64  # images per forward pass during feature extraction
    workers: int = 2  # image-loading processes during extraction (0 = in the main process)
    input_size: int | None = None  # None = the encoder's: AlexNet 227, ResNet-50 and ViT 224
    resize_shorter: int | None = 256  # TRAIN/TEST.SCALE before the global resize
    cache_dir: str | None = None  # None = <results root>/cache/features
    on_bad_data: OnBadData = "error"
    keep_host_memory: bool = True
    # the encoder's forward pass (features.py): auto = bf16 on a GPU or a CPU with native bf16
    # matmuls, else fp32 (the reference's); recorded in the cache key and the run's settings
    precision: str = "auto"  # as the loop's `train.keep_host_memory`
