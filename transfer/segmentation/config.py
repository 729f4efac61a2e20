"""Segmentation transfer settings. Defaults are PROTOCOL.md's FCN values (see the comments for
where a default is the released code's choice rather than the paper's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from benchmark.loop import LoopConfig

Backend = Literal["native", "mmseg"]
Variant = Literal["fcn32s", "fcn16s", "fcn8s"]
Solver = Literal["sgd", "adam"]


@dataclass
class SegmentationTrainConfig(LoopConfig):
    """FCN-AlexNet's solver (voc-fcn-alexnet/solver.prototxt): SGD at a fixed lr 1e-4,
    momentum 0.9, weight decay 5e-4, one image per pass, gradients accumulated over
    `iter_size` 20 passes per update, 100k updates."""

    iterations: int = 100000
    batch_size: int = 1  # images per forward pass (FCN: 1, whole images of any size)
    iter_size: int = 20  # passes accumulated per update (Caffe's iter_size)
    lr: float = 1e-4
    # "adam" is not the protocol: it makes CPU demos on random-init encoders learn within a
    # minute (SGD at lr 1e-4 needs thousands of iterations). Momentum is Adam's beta1.
    solver: Solver = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    workers: int = 2


@dataclass
class FCNResNetTrainConfig(LoopConfig):
    """mmsegmentation's 20k schedule (schedule_20k.py) at its VOC12aug batch (4 GPUs x 4)."""

    iterations: int = 20000
    batch_size: int = 16  # crops per SGD step (split over torchrun processes)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter (no paramwise_cfg)
    poly_power: float = 0.9  # PolyLR: (lr - min_lr) (1 - t / iterations)^power + min_lr
    min_lr: float = 1e-4
    checkpoint_every: int = 2000  # CheckpointHook interval
    workers: int = 4


@dataclass
class FCNResNetConfig:
    """FCN on a dilated ResNet (output stride 8) for ResNet encoders, as MMSelfSup's and
    mmsegmentation's fcn_r50-d8 VOC12aug config runs it (`transfer.segmentation.fcn_resnet`)."""

    # ImageSets/Segmentation lists of VOC2012 concatenated for training: `train` with
    # SegmentationClass, `aug` (SBD minus VOC train and val) with SegmentationClassAug
    train_lists: tuple[str, ...] = ("train", "aug")
    split: str = "val"  # evaluation list (1449 images)
    scale: tuple[int, int] = (2048, 512)  # RandomResize / test Resize (long, short) bound
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True  # PhotoMetricDistortion
    channels: int = 512  # decode head width
    aux_channels: int = 256
    aux_weight: float = 0.4  # auxiliary FCN head on res4 (0: none)
    dropout: float = 0.1
    norm: Literal["batch", "frozen"] = "batch"  # SyncBN, norm_eval False
    eval_images: int | None = None  # evaluate on the first N images of `split` (None: all)
    train: FCNResNetTrainConfig = field(default_factory=FCNResNetTrainConfig)


@dataclass
class SegmentationConfig:
    name: str | None = None
    seed: int = 0
    data: str | None = None  # VOCdevkit or VOC2012 folder; None = embedded synthetic data
    sbd: str | None = None  # SBD `dataset/` (or benchmark_RELEASE); None = beside `data`
    use_sbd: bool = True  # add SBD's cls/*.mat annotations to the training set
    device: str = "auto"
    weights: str | None = None  # run folder, .safetensors, torchvision .pth; None = random
    arch: str = "caffenet"  # architecture of the random baseline (files carry their own)
    backend: Backend = "native"
    on_bad_data: Literal["error", "skip"] = "error"  # a file `bench data check` flags
    variant: Variant = "fcn32s"
    # sbd-train: SBD's train split, as FCN-AlexNet trained (the paper: "using the additional
    # training data" of Hariharan et al.); voc+sbd: VOC2012 `train_split` + SBD train and val.
    train_set: Literal["sbd-train", "voc+sbd"] = "sbd-train"
    train_split: str = "train"  # ImageSets/Segmentation/<train_split>.txt (train_set voc+sbd)
    # seg11valid = VOC2011 val minus SBD train (derived from the split files the user has);
    # any other name is ImageSets/Segmentation/<split>.txt. The split actually used is
    # recorded in metrics.json under an honest name.
    split: str = "seg11valid"
    # Krähenbühl et al. 2015 data-dependent init (as classification's `rescale`): unit-scale
    # activations in every layer, which lets a random-init encoder learn in demo budgets.
    rescale: bool = False
    rescale_images: int = 16  # training images (resized to 227x227) used for the statistics
    fc_dim: int = 4096  # fc6/fc7 width (AlexNet's)
    dropout: float = 0.5
    pad: int = 100  # FCN's conv1 padding, so every input size yields scores
    # deconv: FCN-AlexNet's fixed bilinear up-convolution (kernel 63, stride 32) and crop,
    # which fades to zero past the outermost score centres (voc-fcn-alexnet/train.prototxt
    # upscore + score Crop offset 18); interpolate: the same interpolation holding the edge
    # scores instead (bench's earlier choice).
    upsample: Literal["deconv", "interpolate"] = "deconv"
    max_size: int | None = None  # resize the longer image side to at most this (None: as is)
    normalize_loss: bool = True  # softmax loss averaged over non-ignored pixels (PROTOCOL)
    mirror: bool = False  # FCN trains without augmentation
    eval_images: int | None = None  # evaluate on the first N images of the split (None: all)
    save_overlays: int = 0  # PNG overlays (image | truth | prediction) of the first K images
    eval_every: int = 0  # also evaluate during training every N iterations (0: only at end)
    train: SegmentationTrainConfig = field(default_factory=SegmentationTrainConfig)
    # The protocol of ResNet encoders (the keys above are FCN-AlexNet's): which one runs is
    # the encoder's family (transfer.segmentation.train.main).
    fcn_resnet: FCNResNetConfig = field(default_factory=FCNResNetConfig)
