"""The same Fast R-CNN protocol run through detectron2, used as a library at the edge.

detectron2 is imported only here and only when `backend: detectron2` is chosen. Our parts:
the AlexNet encoder registered as a detectron2 backbone (`AlexNetBackbone`, output
"conv5", stride 16, holding the encoder as `features` so that `bench export --format
detectron2` keys `backbone.features.N.*` load unchanged), a box head with Fast R-CNN's
dropout (`AlexNetFCHead`: fc6, fc7 re-initialised), and a detectron2 config that encodes
the protocol (`fast_rcnn_config`). Everything else is detectron2's: VOC registration
(register_pascal_voc), precomputed proposals (PrecomputedProposals with
DATASETS.PROPOSAL_FILES_*), RoI sampling, the loss, inference, DetectionCheckpointer and
PascalVOCDetectionEvaluator. The loop is a plain one, as in detectron2's
tools/plain_train_net.py; checkpoints go through bench's atomic writers.

Known differences from the native backend: detectron2's VOC loader keeps difficult
objects in training (native leaves them out, as Fast R-CNN does), and its boxes are
continuous (x1 - 1, y1 - 1, x2, y2) rather than inclusive pixel indices.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.config import to_dict
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import BenchError
from benchmark.runs import Run, atomic_write_bytes
from pretrain.alexnet import CONV_INDICES, PIXEL_MEAN, PIXEL_STD, AlexNetEncoder
from transfer.detection.config import DetectionConfig

INSTALL_HINT = (
    "backend: detectron2 is not installed; install it with "
    "pip install 'git+https://github.com/facebookresearch/detectron2.git' "
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html) "
    "or use backend: native"
)
BACKBONE_NAME = "build_alexnet_backbone"
HEAD_NAME = "AlexNetFCHead"


def require_detectron2() -> Any:
    """Import detectron2 or raise the one-line BenchError that says how to install it."""
    try:
        import detectron2
        import detectron2.modeling  # noqa: F401 - fails when the C++ ops were not built
    except ImportError:
        raise BenchError(INSTALL_HINT) from None
    register_components()
    return detectron2


def register_components() -> None:
    """Add our backbone and box head to detectron2's registries (once per process)."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY, Backbone
    from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY

    if BACKBONE_NAME in BACKBONE_REGISTRY:
        return

    class AlexNetBackbone(Backbone):
        """conv1-relu5 of the AlexNet encoder: (B, 3, H, W) -> {"conv5": (B, 256, H/16, W/16)}."""

        def __init__(self, arch: str, pool_free: bool, freeze_at: int) -> None:
            super().__init__()
            encoder = AlexNetEncoder(arch, pool_free)  # type: ignore[arg-type]
            self.features = encoder.features[:12]
            self._channels = encoder.out_channels
            for idx in CONV_INDICES[:freeze_at]:
                for p in self.features[idx].parameters():
                    p.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"conv5": self.features(x)}

        def output_shape(self) -> dict[str, ShapeSpec]:
            return {"conv5": ShapeSpec(channels=self._channels, stride=16)}

    def build_alexnet_backbone(cfg: Any, input_shape: ShapeSpec) -> Backbone:
        b = cfg.MODEL.ALEXNET
        return AlexNetBackbone(b.ARCH, b.POOL_FREE, cfg.MODEL.BACKBONE.FREEZE_AT)

    class AlexNetFCHead(nn.Module):
        """RoI features (R, 256, 6, 6) -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout."""

        def __init__(self, cfg: Any, input_shape: ShapeSpec) -> None:
            super().__init__()
            dim = cfg.MODEL.ROI_BOX_HEAD.FC_DIM
            in_dim = input_shape.channels * input_shape.height * input_shape.width
            self.fc6 = nn.Linear(in_dim, dim)
            self.fc7 = nn.Linear(dim, dim)
            self.dropout = nn.Dropout(cfg.MODEL.ALEXNET.DROPOUT)
            for fc in (self.fc6, self.fc7):
                nn.init.normal_(fc.weight, 0.0, 0.005)
                nn.init.constant_(fc.bias, 0.1)
            self._output_size = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.dropout(torch.relu(self.fc6(x.flatten(1))))
            return self.dropout(torch.relu(self.fc7(x)))

        @property
        def output_shape(self) -> ShapeSpec:
            return ShapeSpec(channels=self._output_size)

    BACKBONE_REGISTRY.register(build_alexnet_backbone)
    ROI_BOX_HEAD_REGISTRY.register(AlexNetFCHead)


def fast_rcnn_config(
    cfg: DetectionConfig,
    *,
    arch: str,
    pool_free: bool,
    train_dataset: str,
    test_dataset: str,
    proposals_train: Path,
    proposals_test: Path,
    weights: Path | None,
    output_dir: Path,
    device: str,
) -> Any:
    """A detectron2 CfgNode holding the protocol: precomputed proposals, RoI max pooling 6x6
    at 1/16, fc6/fc7 with dropout, 2 images x 64 RoIs (25% fg >= 0.5, bg [0.1, 0.5)),
    smooth-L1 box loss with targets scaled by 1/(0.1, 0.1, 0.2, 0.2), Caffe's bias lr x2."""
    from detectron2.config import CfgNode, get_cfg

    if cfg.bbox_normalize != "fixed":
        raise BenchError("bbox_normalize: detectron2 backend supports only 'fixed' target scaling")
    if cfg.rescale:
        raise BenchError("rescale: not available with the detectron2 backend (use backend: native)")
    c = get_cfg()
    c.MODEL.ALEXNET = CfgNode({"ARCH": arch, "POOL_FREE": pool_free, "DROPOUT": cfg.dropout})
    c.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    c.MODEL.DEVICE = device
    c.MODEL.WEIGHTS = str(weights) if weights else ""
    c.MODEL.MASK_ON = False
    c.MODEL.KEYPOINT_ON = False
    c.MODEL.LOAD_PROPOSALS = True
    c.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    c.MODEL.BACKBONE.NAME = BACKBONE_NAME
    c.MODEL.BACKBONE.FREEZE_AT = cfg.freeze_at
    # The encoder takes RGB (x / 255 - mean) / std; detectron2 computes (x - MEAN) / STD.
    c.INPUT.FORMAT = "RGB"
    c.MODEL.PIXEL_MEAN = [255.0 * m for m in PIXEL_MEAN]
    c.MODEL.PIXEL_STD = [255.0 * s for s in PIXEL_STD]
    c.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    c.MODEL.ROI_HEADS.IN_FEATURES = ["conv5"]
    c.MODEL.ROI_HEADS.NUM_CLASSES = len(VOC_CLASSES)
    c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = cfg.rois_per_batch // cfg.ims_per_batch
    c.MODEL.ROI_HEADS.POSITIVE_FRACTION = cfg.fg_fraction
    # IoU < bg_lo: ignored; [bg_lo, fg): background; >= fg: foreground (Fast R-CNN's bands).
    c.MODEL.ROI_HEADS.IOU_THRESHOLDS = [cfg.bg_thresh_lo, cfg.fg_thresh]
    c.MODEL.ROI_HEADS.IOU_LABELS = [-1, 0, 1]
    c.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True
    c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_thresh
    c.MODEL.ROI_HEADS.NMS_THRESH_TEST = cfg.nms
    c.TEST.DETECTIONS_PER_IMAGE = cfg.max_per_image
    c.MODEL.ROI_BOX_HEAD.NAME = HEAD_NAME
    c.MODEL.ROI_BOX_HEAD.FC_DIM = cfg.fc_dim
    c.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    c.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = cfg.roi_size
    c.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    c.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = tuple(1.0 / s for s in cfg.bbox_stds)
    c.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 1.0
    c.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
    c.DATASETS.TRAIN = (train_dataset,)
    c.DATASETS.TEST = (test_dataset,)
    c.DATASETS.PROPOSAL_FILES_TRAIN = (str(proposals_train),)
    c.DATASETS.PROPOSAL_FILES_TEST = (str(proposals_test),)
    c.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = cfg.ss_max_boxes
    c.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = cfg.ss_max_boxes
    c.DATALOADER.NUM_WORKERS = cfg.workers
    c.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    c.INPUT.MIN_SIZE_TRAIN = tuple(cfg.scales)
    c.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    c.INPUT.MAX_SIZE_TRAIN = cfg.max_size
    c.INPUT.MIN_SIZE_TEST = cfg.test_scale
    c.INPUT.MAX_SIZE_TEST = cfg.test_max_size
    c.INPUT.RANDOM_FLIP = "horizontal" if cfg.flip else "none"
    c.SOLVER.IMS_PER_BATCH = cfg.ims_per_batch
    c.SOLVER.BASE_LR = cfg.lr
    c.SOLVER.STEPS = tuple(cfg.lr_steps)
    c.SOLVER.GAMMA = cfg.gamma
    c.SOLVER.MAX_ITER = cfg.iterations
    c.SOLVER.MOMENTUM = cfg.momentum
    c.SOLVER.WEIGHT_DECAY = cfg.weight_decay
    c.SOLVER.WEIGHT_DECAY_BIAS = 0.0
    c.SOLVER.BIAS_LR_FACTOR = cfg.bias_lr_mult
    c.SOLVER.WARMUP_ITERS = 0  # Fast R-CNN has no warm-up
    c.SOLVER.CHECKPOINT_PERIOD = cfg.checkpoint_every
    c.TEST.EVAL_PERIOD = 0
    c.OUTPUT_DIR = str(output_dir)
    c.SEED = cfg.seed
    c.freeze()
    return c


def write_detectron2_weights(encoder: AlexNetEncoder, path: Path) -> Path:
    """The encoder in `bench export --format detectron2`'s layout (backbone.features.N.*)."""
    model = {f"backbone.{k}": v.detach().cpu().numpy() for k, v in encoder.state_dict().items()}
    blob = {"model": model, "__author__": "bench", "matching_heuristics": False}
    atomic_write_bytes(path, pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def detectron2_weights_card(weights: str | None, arch: str, folder: Path) -> tuple[Path, dict]:
    """(detectron2 weights file, model card): an exported .pkl is used as it is (its card is
    read from `<stem>.card.json` when present); anything else is converted into `folder`."""
    from transfer.backbone import load_encoder

    if weights and Path(weights).suffix == ".pkl":
        path = Path(weights)
        if not path.is_file():
            raise BenchError(f"{path}: weights file not found")
        card_file = path.with_name(path.stem + ".card.json")
        card: dict[str, Any] = {"method": "unknown", "arch": arch, "pool_free": False}
        if card_file.is_file():
            import json

            card.update(json.loads(card_file.read_text()))
        return path, card
    encoder, card = load_encoder(weights, arch)
    return write_detectron2_weights(encoder, folder / "encoder_detectron2.pkl"), card


def register_voc(voc_root: Path, split: str) -> str:
    """Register VOC2007 `split` with detectron2's own helper; returns the dataset name."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_pascal_voc

    name = f"bench_voc2007_{split}_{abs(hash(str(Path(voc_root).resolve()))) % 10**8}"
    if name not in DatasetCatalog.list():
        register_pascal_voc(name, str(voc_root), split, 2007, list(VOC_CLASSES))
    return name


def build_fast_rcnn(d2cfg: Any) -> nn.Module:
    """detectron2 model for the config; exported weights loaded by DetectionCheckpointer."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    require_detectron2()
    model = build_model(d2cfg)
    if d2cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(d2cfg.MODEL.WEIGHTS)
    return model


def _collector() -> Any:
    from detectron2.evaluation import DatasetEvaluator

    class CollectDetections(DatasetEvaluator):
        """Keeps every detection in devkit coordinates for our own scoring."""

        def reset(self) -> None:
            self.dets: dict[str, list] = {c: [] for c in VOC_CLASSES}

        def process(self, inputs: list[dict], outputs: list[dict]) -> None:
            for inp, out in zip(inputs, outputs):
                inst = out["instances"].to("cpu")
                boxes = inst.pred_boxes.tensor.numpy()
                for b, s, c in zip(boxes, inst.scores.tolist(), inst.pred_classes.tolist()):
                    # detectron2's continuous box -> the devkit's 1-based pixels
                    box = (float(b[0]) + 1, float(b[1]) + 1, float(b[2]), float(b[3]))
                    self.dets[VOC_CLASSES[c]].append((str(inp["image_id"]), float(s), box))

        def evaluate(self) -> dict:
            return {}

    return CollectDetections()


def run_detectron2(cfg: DetectionConfig, run: Run, voc_root: Path) -> dict[str, Any]:
    """Train and evaluate through detectron2; writes the same metrics as the native backend."""
    require_detectron2()
    import detectron2
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.evaluation import (
        DatasetEvaluators,
        PascalVOCDetectionEvaluator,
        inference_on_dataset,
    )
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.utils.events import EventStorage

    from benchmark.distributed import pick_device
    from transfer.common import run_command
    from transfer.detection import attach_proposals, finite_or_none, score_fields
    from transfer.detection.data import load_records
    from transfer.detection.evaluate import coco_ap, voc07_scores, write_results_files
    from transfer.detection.proposals import write_detectron2_pickle

    work = run.path / "detectron2"
    work.mkdir(parents=True, exist_ok=True)
    weights, card = detectron2_weights_card(cfg.weights, cfg.arch, work)
    props = {}
    records = {}
    for split, source in (
        (cfg.train_split, cfg.proposals_train),
        (cfg.test_split, cfg.proposals_test),
    ):
        recs = load_records(voc_root, split)
        attach_proposals(recs, source, cfg, split)
        props[split] = work / f"proposals_{split}.pkl"
        write_detectron2_pickle(
            props[split], [r.image_id for r in recs], [r.proposals for r in recs]
        )
        records[split] = recs
    d2cfg = fast_rcnn_config(
        cfg,
        arch=card.get("arch", cfg.arch),
        pool_free=bool(card.get("pool_free", False)),
        train_dataset=register_voc(voc_root, cfg.train_split),
        test_dataset=register_voc(voc_root, cfg.test_split),
        proposals_train=props[cfg.train_split],
        proposals_test=props[cfg.test_split],
        weights=weights,
        output_dir=work,
        device=pick_device(cfg.device).type,
    )
    (work / "config.yaml").write_text(d2cfg.dump())
    torch.manual_seed(cfg.seed)
    model = build_fast_rcnn(d2cfg)
    optimizer = build_optimizer(d2cfg, model)
    scheduler = build_lr_scheduler(d2cfg, optimizer)
    start = 0
    state = run.load_checkpoint() if run.resumed else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
    t0 = time.time()
    if start < cfg.iterations:
        _train_loop(
            model,
            build_detection_train_loader(d2cfg),
            optimizer,
            scheduler,
            cfg,
            run,
            start,
            EventStorage,
        )
    train_seconds = time.time() - t0
    test_name = d2cfg.DATASETS.TEST[0]
    collector = _collector()
    evaluators = DatasetEvaluators([PascalVOCDetectionEvaluator(test_name), collector])
    model.eval()
    results = inference_on_dataset(model, build_detection_test_loader(d2cfg, test_name), evaluators)
    detections = collector.dets
    if run.is_main:
        write_results_files(run.file("detections"), detections)
    per_class, mean = voc07_scores(detections, records[cfg.test_split])
    coco = coco_ap(detections, records[cfg.test_split])
    bbox = results.get("bbox", {})
    metrics = {
        "stage": "transfer",
        "task": "detection",
        "backend": "detectron2",
        "detectron2_version": detectron2.__version__,
        **score_fields(card, cfg.weights, mean, coco, per_class),
        # detectron2's own PascalVOCDetectionEvaluator (percent in detectron2 -> fraction)
        "detectron2_ap50": finite_or_none(float(bbox.get("AP50", float("nan"))) / 100),
        "detectron2_ap": finite_or_none(float(bbox.get("AP", float("nan"))) / 100),
        "seed": cfg.seed,
        "command": run_command(run),
        "iterations": cfg.iterations,
        "train_seconds": round(train_seconds, 2),
        "test_images": len(records[cfg.test_split]),
    }
    run.logger.info(
        f"detectron2 detection mAP {metrics['map']}  detectron2 AP50 {metrics['detectron2_ap50']}"
    )
    run.write_metrics(metrics)
    return metrics


def _train_loop(
    model: nn.Module,
    loader: Any,
    optimizer: Any,
    scheduler: Any,
    cfg: DetectionConfig,
    run: Run,
    start: int,
    event_storage: Any,
) -> None:
    """detectron2's plain_train_net loop with bench's scalars and atomic checkpoints."""
    from tqdm import tqdm

    model.train()
    bar = tqdm(
        range(start, cfg.iterations),
        desc="fast r-cnn (detectron2)",
        unit="it",
        disable=None,
        initial=start,
        total=cfg.iterations,
    )
    with event_storage(start) as storage:
        for data, it in zip(loader, bar):
            storage.iter = it
            losses = model(data)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise BenchError(f"training diverged: loss is {loss.item()} at iteration {it}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                values = {k: v.item() for k, v in losses.items()}
                values["lr"] = optimizer.param_groups[0]["lr"]
                run.log_scalars(done, values, prefix="train/")
                run.logger.info(
                    f"it {done}/{cfg.iterations} "
                    + " ".join(f"{k} {v:.4f}" for k, v in values.items())
                )
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                run.save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "iteration": done,
                        "config": to_dict(cfg),
                    }
                )
