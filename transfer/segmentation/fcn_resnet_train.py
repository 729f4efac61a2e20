"""`bench transfer --task segmentation` for a ResNet encoder: FCN on a dilated ResNet-50
(`fcn_resnet.py`) over VOC2012 train + SBD ("aug", 10582 images), scored on VOC2012 val by
mean IU, as MMSelfSup's and mmsegmentation's fcn_r50-d8 VOC12aug config runs it.

Training lists (`train_lists`): ImageSets/Segmentation/train.txt with SegmentationClass
and aug.txt with SegmentationClassAug, concatenated (mmseg's ConcatDataset; the layout
mmseg's tools/dataset_converters/voc_aug.py writes). Where SegmentationClassAug or aug.txt
is absent, they are derived from SBD's cls/*.mat found beside the VOCdevkit (aug = SBD
train + val minus VOC2012 train and val, the converter's rule).

Each training crop as mmseg's pipeline makes it: RandomResize (scale (2048, 512) times a
ratio drawn from [0.5, 2], keeping the aspect: mmcv's imrescale), RandomCrop 512 (up to
10 draws until no class covers 75% of the labelled pixels), horizontal flip 1/2,
PhotoMetricDistortion (brightness, contrast before or after, saturation, hue; each 1/2),
Pad to 512 (image 0, label 255). Every draw comes from a generator keyed by (seed, sample
number), so a resumed run sees the same crops. Test: each val image rescaled to (2048, 512)
whole, logits resized to the label's size, arg-max; the accumulated confusion matrix gives
mean IU (nan-mean over classes, as mmseg's IoUMetric and FCN's score.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from benchmark import distributed, loop
from benchmark.datasets.folder import load_rgb
from benchmark.datasets.resolve import resolve_data
from benchmark.datasets.voc import IGNORE_INDEX, Problem, SegSample, read_label, read_split
from benchmark.distributed import DistEnv
from benchmark.errors import ConfigError, DatasetError
from benchmark.input_convention import InputConvention
from benchmark.metrics import confusion_matrix
from benchmark.runs import Run
from transfer import common
from transfer.encoder_family import load_resnet
from transfer.segmentation.config import FCNResNetConfig, SegmentationConfig
from transfer.segmentation.data import CLASSES, find_sbd
from transfer.segmentation.evaluate import NUM_CLASSES, scores_from_hist
from transfer.segmentation.fcn_resnet import FCNResNet, poly_lr, seg_loss

STAGE = "transfer/segmentation"


def check_fcn_resnet(c: FCNResNetConfig) -> None:
    """The FCN-ResNet settings no run can use, as one-line errors."""
    t = c.train
    loop.check_loop(t, "fcn_resnet.train")
    if not c.train_lists:
        raise ConfigError("fcn_resnet.train_lists: at least one list")
    if c.crop_size < 8 or min(c.scale) < 1 or not 0 < c.ratio_range[0] <= c.ratio_range[1]:
        raise ConfigError("fcn_resnet: crop_size >= 8, scale >= 1, 0 < ratio_range[0] <= [1]")
    if not 0 < c.cat_max_ratio <= 1 or not 0 <= c.dropout < 1 or c.aux_weight < 0:
        raise ConfigError("fcn_resnet: cat_max_ratio in (0, 1], dropout in [0, 1), "
                          "aux_weight >= 0")  # fmt: skip
    if t.batch_size < 1 or not 0 <= t.min_lr < t.lr or not 0 <= t.momentum < 1:
        raise ConfigError("fcn_resnet.train: batch_size >= 1, 0 <= min_lr < lr, momentum in "
                          "[0, 1)")  # fmt: skip


# ---------------------------------------------------------------- data


def aug_ids(voc: Path, sbd: Path | None) -> list[str]:
    """aug.txt, or voc_aug.py's rule on SBD's lists: SBD train + val minus VOC train, val."""
    if (voc / "ImageSets" / "Segmentation" / "aug.txt").is_file():
        return read_split(voc, "aug", "Segmentation")
    if sbd is None:
        raise DatasetError(f"{voc}: no ImageSets/Segmentation/aug.txt and no SBD found to "
                           "derive it (give SBD with --set sbd=...)")  # fmt: skip
    sbd_ids: list[str] = []
    for s in ("train", "val"):
        path = sbd / f"{s}.txt"
        if path.is_file():
            sbd_ids += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    voc_ids = {i for s in ("train", "val") for i in read_split(voc, s, "Segmentation")}
    return sorted(set(sbd_ids) - voc_ids)


def train_samples(voc: Path, sbd: Path | None, lists: Sequence[str],
                  problems: list[Problem]) -> list[SegSample]:  # fmt: skip
    """The concatenated training lists; an `aug` label from SegmentationClassAug, else SBD."""
    out = []
    for name in lists:
        ids = aug_ids(voc, sbd) if name == "aug" else read_split(voc, name, "Segmentation",
                                                                 problems)  # fmt: skip
        for i in ids:
            mask = voc / "SegmentationClass" / f"{i}.png"
            if name == "aug":
                mask = voc / "SegmentationClassAug" / f"{i}.png"
                if not mask.is_file() and sbd is not None:
                    mask = sbd / "cls" / f"{i}.mat"
            out.append(SegSample(i, voc / "JPEGImages" / f"{i}.jpg", mask))
    return out


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's imrescale size for (long, short) bound `scale`: (new h, new w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 RGB image (its defaults: brightness 32,
    contrast and saturation 0.5-1.5, hue 18); HSV through OpenCV as mmcv's bgr2hsv."""

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = int(rng.integers(2))
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-18, 19))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0:
        img = contrast(img)
    return img


def crop_box(label: np.ndarray, size: int, cat_max_ratio: float,
             rng: np.random.Generator) -> tuple[int, int]:  # fmt: skip
    """RandomCrop's offsets (y, x): up to 10 redraws while one class covers >= cat_max_ratio
    of the crop's labelled pixels (or it holds one class)."""

    def draw() -> tuple[int, int]:
        return (int(rng.integers(0, max(label.shape[0] - size, 0) + 1)),
                int(rng.integers(0, max(label.shape[1] - size, 0) + 1)))  # fmt: skip

    y, x = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            values, cnt = np.unique(label[y : y + size, x : x + size], return_counts=True)
            cnt = cnt[values != IGNORE_INDEX]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


class CropSet(Dataset):
    """Item (index, sample number) -> (image (3, S, S) float input, label (S, S) int64)."""

    def __init__(self, samples: Sequence[SegSample], c: FCNResNetConfig, seed: int,
                 convention: InputConvention) -> None:  # fmt: skip
        self.samples, self.c, self.seed, self.convention = list(samples), c, seed, convention

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, sample = key
        c, s = self.c, self.samples[index]
        rng = np.random.default_rng([self.seed, 31, sample])
        img = np.asarray(load_rgb(s.image_path), dtype=np.uint8)
        label = read_label(s.mask_path)
        ratio = rng.random() * (c.ratio_range[1] - c.ratio_range[0]) + c.ratio_range[0]
        h, w = rescale_size(*label.shape, (int(c.scale[0] * ratio), int(c.scale[1] * ratio)))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        y, x = crop_box(label, c.crop_size, c.cat_max_ratio, rng)
        img = img[y : y + c.crop_size, x : x + c.crop_size]
        label = label[y : y + c.crop_size, x : x + c.crop_size]
        if c.flip and rng.random() < 0.5:
            img, label = img[:, ::-1], label[:, ::-1]
        if c.photometric:
            img = photometric(np.ascontiguousarray(img), rng)
        out_img = np.zeros((c.crop_size, c.crop_size, 3), np.uint8)
        out_lab = np.full((c.crop_size, c.crop_size), IGNORE_INDEX, np.uint8)
        out_img[: img.shape[0], : img.shape[1]] = img
        out_lab[: label.shape[0], : label.shape[1]] = label
        return (self.convention.normalise_hwc(out_img.astype(np.float32)),
                torch.from_numpy(out_lab.astype(np.int64)))  # fmt: skip


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])


def prepare(cfg: SegmentationConfig, run: Run) -> tuple[list[SegSample], list[SegSample], list]:
    """(training samples, evaluation samples, skipped ids), every file checked first."""
    c = cfg.fcn_resnet
    voc = Path(resolve_data(cfg.data, "voc2012"))
    sbd = find_sbd(cfg.data, cfg.sbd, voc, True) if "aug" in c.train_lists else None
    listed: list[Problem] = []
    train = train_samples(voc, sbd, c.train_lists, listed)
    ids = read_split(voc, c.split, "Segmentation", listed)
    evaluation = [SegSample(i, voc / "JPEGImages" / f"{i}.jpg",
                            voc / "SegmentationClass" / f"{i}.png") for i in ids]  # fmt: skip
    if c.eval_images is not None:
        evaluation = evaluation[: c.eval_images]
    skipped = sorted(common.enforce(listed, cfg.on_bad_data, what="segmentation split files",
                                    logger=run.logger))  # fmt: skip
    train, skip_train = common.checked_segmentation(train, cfg.on_bad_data, run.logger,
                                                    "training set")  # fmt: skip
    evaluation, skip_eval = common.checked_segmentation(evaluation, cfg.on_bad_data, run.logger,
                                                        f"voc2012-{c.split}")  # fmt: skip
    run.logger.info(f"fcn r50-d8: train {len(train)} images ({' + '.join(c.train_lists)} of "
                    f"{voc}), evaluation on {c.split} ({len(evaluation)})")  # fmt: skip
    return train, evaluation, [*skipped, *skip_train, *skip_eval]


# ---------------------------------------------------------------- train and test


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, c: FCNResNetConfig,
              precision: loop.Precision, device: torch.device):  # fmt: skip
    t = c.train

    def step(batch: tuple[torch.Tensor, torch.Tensor], iteration: int) -> dict[str, Any]:
        lr = poly_lr(t.lr, t.min_lr, t.poly_power, t.iterations, iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images, labels = batch[0].to(device), batch[1].to(device)
        with precision.autocast():
            logits, aux = model(images)
        loss_decode = seg_loss(logits, labels)
        loss = loss_decode
        out = {"loss_decode": loss_decode.detach()}
        if aux is not None:
            loss_aux = c.aux_weight * seg_loss(aux, labels)
            loss = loss + loss_aux
            out["loss_aux"] = loss_aux.detach()
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        return {"loss": loss.detach(), **out, "lr": lr}

    return step


@torch.no_grad()
def evaluate(model: FCNResNet, samples: Sequence[SegSample], c: FCNResNetConfig,
             env: DistEnv, precision: loop.Precision) -> np.ndarray:  # fmt: skip
    """(21, 21) confusion matrix of whole-image predictions at the test scale, summed over
    torchrun processes (rank r takes images r, r + world, ...)."""
    model.eval()
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    mine = range(env.rank, len(samples), env.world_size)
    for n in tqdm(mine, desc="evaluate", disable=None if env.is_main else True, leave=False):
        s = samples[n]
        img = np.asarray(load_rgb(s.image_path), dtype=np.uint8)
        label = read_label(s.mask_path)
        h, w = rescale_size(*label.shape, tuple(c.scale))
        x = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        x = model.convention.normalise_hwc(x)[None].to(env.device)
        with precision.autocast():
            logits = model(x, out_size=label.shape)
        pred = logits.float().argmax(1)[0].to(torch.uint8).cpu().numpy()
        hist += confusion_matrix(pred, label, NUM_CLASSES, ignore_index=IGNORE_INDEX)
    return distributed.all_reduce_sum(torch.from_numpy(hist).to(env.device)).cpu().numpy()


def run_fcn_resnet(cfg: SegmentationConfig, run: Run) -> dict[str, Any]:
    """Train FCN-ResNet, evaluate mean IU, write metrics.json."""
    c, t = cfg.fcn_resnet, cfg.fcn_resnet.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)
    train, evaluation, skipped = prepare(cfg, run)
    encoder, card = load_resnet(cfg.weights, cfg.arch, "FCN-ResNet segmentation")
    model = FCNResNet(encoder, c.channels, c.aux_channels, c.aux_weight, c.dropout, c.norm)
    model.to(env.device).train()
    if env.world_size > 1 and c.norm == "batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = loop.prepare_model(model, env, t)
    optimizer = loop.sgd([p for p in model.parameters() if p.requires_grad], t.lr, t.momentum,
                         weight_decay=t.weight_decay)  # fmt: skip
    precision = loop.Precision(t.precision, env.device)
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(net, optimizer, c, precision, env.device),
        batches=loop.loader_batches(CropSet(train, c, cfg.seed, encoder.input_convention),
                                    t.batch_size, cfg.seed, env, t.workers, collate_fn=collate),
        state={"model": net, "optimizer": optimizer}, precision=precision,
        desc="fcn r50-d8", input_convention=encoder.input_convention.name,
    )  # fmt: skip
    tick = time.perf_counter()
    hist = evaluate(model, evaluation, c, env, precision)
    scores = scores_from_hist(hist, CLASSES)
    metrics = {
        **common.metrics_head("segmentation", "native", cfg, run, card, card.get("arch"),
                              device=env.device, precision=result.precision),
        "model": "fcn-resnet-d8",
        **scores,
        "split": f"voc2012-{c.split}", "eval_images": len(evaluation),
        "train_images": len(train), **loop.fit_fields(result, env.device),
        "eval_seconds": time.perf_counter() - tick,
        "skipped": common.skipped_field(skipped),
        "confusion_matrix": hist.tolist(),
    }  # fmt: skip
    run.log_scalars(result.iterations, {"mean_iu": scores["mean_iu"] or 0.0}, prefix="val/")
    run.logger.info(f"segmentation (voc2012-{c.split}): mean IU {scores['mean_iu']}")
    run.write_metrics(metrics)
    return metrics
