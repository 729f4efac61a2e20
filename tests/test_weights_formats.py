"""Checkpoints written here in each tool's own layout import with the original's features.

Every writer below builds its layout from a real (width-reduced, randomly initialised)
torchvision ResNet or timm ViT the way that tool saves it, independently of weights/:
prefixes, heads, momentum copies, queues, optimiser state, detectron2's renaming as MoCo's
converter does it. The imported encoder must hold exactly the original tensors and give
exactly the original network's features; the full-size ResNet-50 / ViT-S/16 key sets are
checked on the meta device.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from encoders import ResNetEncoder, vit_module
from weights import (
    FORMATS,
    describe_format,
    encoder_spec,
    format_key_map,
    import_checkpoint,
    map_keys,
    show_keys,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, WIDTH, RSIDE = (2, 1, 1, 1), 8, 64
# 64-d heads as timm's ViTs (the head count is not in the tensors: timm's width / 64 rule)
VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 2}


@dataclass
class Original:
    net: nn.Module  # the network as its tool holds it, classifier included
    body: dict[str, torch.Tensor]  # its state dict without the classifier
    features: dict[str, torch.Tensor]
    head: torch.Tensor
    x: torch.Tensor


@torch.no_grad()
def _jitter(net: nn.Module, seed: int) -> None:
    """Norm layers away from identity, so that eval-mode statistics show in the features."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.normal_(1.0, 0.2, generator=g)
            m.bias.normal_(0.0, 0.2, generator=g)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.num_batches_tracked.fill_(1000)


@pytest.fixture(scope="module")
def resnet() -> Original:
    torch.manual_seed(0)
    net = ResNet(Bottleneck, list(LAYERS), width_per_group=WIDTH, num_classes=10).eval()
    _jitter(net, 1)
    body = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    ref = ResNetEncoder(LAYERS, WIDTH, RSIDE)
    ref.load_state_dict(body)
    x = torch.randn(2, 3, RSIDE, RSIDE)
    trunk = ResNet(Bottleneck, list(LAYERS), width_per_group=WIDTH, num_classes=10).eval()
    trunk.load_state_dict(net.state_dict())
    trunk.fc = nn.Identity()
    with torch.no_grad():
        return Original(net, body, ref.eval().extract(x, list(ref.taps)), trunk(x), x)


@pytest.fixture(scope="module")
def vit() -> Original:
    from timm.models.vision_transformer import VisionTransformer

    vm = vit_module()
    torch.manual_seed(0)
    net = VisionTransformer(**VIT, num_classes=10).eval()
    _jitter(net, 2)
    body = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    ref = vm.ViTEncoder(vm.ViTConfig(128, 4, 2, 16, 32)).eval()
    ref.load_state_dict(body)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        head = net.forward_head(net.forward_features(x), pre_logits=True)
        return Original(net, body, ref.extract(x, list(ref.taps)), head, x)


# --------------------------------------------------------------------------- the writers


def _plus(sd: dict[str, torch.Tensor], shift: float = 0.5) -> dict[str, torch.Tensor]:
    """A momentum / target copy: the same keys, other values (a wrong pick would show)."""
    return {k: v + shift if v.is_floating_point() else v.clone() for k, v in sd.items()}


def _prefixed(prefix: str, sd: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in sd.items()}


def _mlp(prefix: str, sizes: list[int], bn: bool = False) -> dict[str, torch.Tensor]:
    """Linear (and BatchNorm1d) layers as nn.Sequential numbers them, e.g. fc.0, fc.1, fc.3."""
    out: dict[str, torch.Tensor] = {}
    index = 0
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        out[f"{prefix}{index}.weight"] = torch.randn(n_out, n_in)
        out[f"{prefix}{index}.bias"] = torch.randn(n_out)
        index += 1
        if i < len(sizes) - 2:
            if bn:
                bn1d = nn.BatchNorm1d(n_out).state_dict()
                out.update(_prefixed(f"{prefix}{index}.", bn1d))
                index += 1
            index += 1  # the ReLU / GELU
    return out


def _optimizer() -> dict[str, Any]:
    return {
        "state": {0: {"momentum_buffer": torch.zeros(3)}},
        "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0, 1, 2]}],
    }


def _sequential(net: nn.Module) -> dict[str, torch.Tensor]:
    """lightly / sthalles: `nn.Sequential(*list(resnet.children())[:-1])`."""
    return nn.Sequential(*list(net.children())[:-1]).state_dict()


def moco_v2(o: Original) -> Any:
    sd = {**o.body, **_mlp("fc.", [2048, 64, 16])}  # v2's MLP head replaces fc
    state = {
        **_prefixed("module.encoder_q.", sd),
        **_prefixed("module.encoder_k.", _plus(sd)),
        "module.queue": torch.randn(16, 256),
        "module.queue_ptr": torch.zeros(1).long(),
    }
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": _optimizer()}


def moco_v1(o: Original) -> Any:
    sd = {**o.body, "fc.weight": torch.randn(128, 2048), "fc.bias": torch.randn(128)}
    state = {
        **_prefixed("module.encoder_q.", sd),
        **_prefixed("module.encoder_k.", _plus(sd)),
        "module.queue": torch.randn(128, 256),
        "module.queue_ptr": torch.zeros(1).long(),
    }
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": _optimizer()}


def moco_v3(o: Original, head: str) -> Any:
    width = 2048 if head == "fc." else VIT["embed_dim"]
    sd = {**o.body, **_mlp(head, [width, 64, 64, 16], bn=True)}  # the projector
    state = {
        **_prefixed("module.base_encoder.", sd),
        **_prefixed("module.momentum_encoder.", _plus(sd)),
        **_prefixed("module.predictor.", _mlp("", [16, 64, 16], bn=True)),
    }
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    return {
        "epoch": 300,
        "arch": "vit_small",
        "state_dict": state,
        "optimizer": _optimizer(),
        "scaler": scaler,
    }


def dino(o: Original, teacher_prefix: str) -> Any:
    head = {
        **_mlp("head.mlp.", [32, 32, 16]),
        "head.last_layer.weight_g": torch.ones(64, 1),
        "head.last_layer.weight_v": torch.randn(64, 16),
    }
    student = {**_prefixed("module.backbone.", _plus(o.body)), **_prefixed("module.", head)}
    teacher = {**_prefixed(teacher_prefix, o.body), **_prefixed(teacher_prefix[:-9], head)}
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005)
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": _optimizer(),
        "epoch": 100,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


def swav(o: Original) -> Any:
    head = {
        **_mlp("projection_head.", [2048, 64, 16], bn=True),
        "prototypes.weight": torch.randn(30, 16),
    }
    return _prefixed("module.", {**o.body, **head})


def byol_sthalles(o: Original) -> Any:
    online = {
        **_prefixed("encoder.", _sequential(o.net)),
        **_mlp("projetion.net.", [2048, 64, 16], bn=True),
    }  # (sic) the repo's spelling
    return {
        "online_network_state_dict": online,
        "target_network_state_dict": _plus(online),
        "optimizer_state_dict": _optimizer(),
    }


def byol_lucidrains(o: Original) -> Any:
    """BYOL(net=resnet).state_dict(): net.* and online_encoder.net.* are the same module."""
    sd = o.net.state_dict()
    return {
        **_prefixed("net.", sd),
        **_prefixed("online_encoder.net.", sd),
        **_mlp("online_encoder.projector.net.", [2048, 64, 16], bn=True),
        **_mlp("online_predictor.net.", [16, 64, 16], bn=True),
        **_prefixed("target_encoder.net.", _plus(sd)),
        **_mlp("target_encoder.projector.net.", [2048, 64, 16], bn=True),
    }


def vissl(o: Original) -> Any:
    trunk = _prefixed("_feature_blocks.", o.body)
    heads = _mlp("0.clf.", [2048, 32, 16])
    model = {"trunk": trunk, "heads": heads}
    return {
        "classy_state_dict": {"base_model": {"model": model, "meta": {}}},
        "phase_idx": 3,
        "iteration": 1200,
        "type": "consolidated",
    }


def vissl_flat(o: Original) -> Any:
    return {**_prefixed("trunk._feature_blocks.", o.body), **_mlp("heads.0.clf.", [2048, 16])}


def mmselfsup(o: Original) -> Any:
    state = {
        **_prefixed("backbone.", o.body),
        **_mlp("neck.mlp.", [2048, 64, 16]),
        **_prefixed("momentum_encoder.0.", _plus(o.body)),
        **_mlp("momentum_encoder.1.mlp.", [2048, 64, 16]),
        "queue": torch.randn(16, 256),
        "queue_ptr": torch.zeros(1).long(),
    }
    meta = {"epoch": 200, "iter": 1000, "mmselfsup_version": "1.0.0rc6", "seed": 0}
    return {"meta": meta, "state_dict": state, "optimizer": _optimizer()}


def mmpretrain_vit(o: Original) -> Any:
    """MMPretrain's VisionTransformer names, as its timm -> mmpretrain converter writes."""
    renames = [
        (r"^patch_embed\.proj\.", "patch_embed.projection."),
        (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
        (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
        (r"^blocks\.(\d+)\.attn\.", r"layers.\1.attn."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
        (r"^norm\.", "ln1."),
    ]
    state = {}
    for key, value in o.body.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        state["backbone." + key] = value
    state.update(_mlp("head.layers.head.", [VIT["embed_dim"], 10]))
    return {"meta": {"epoch": 300, "mmpretrain_version": "1.2.0"}, "state_dict": state}


def solo_learn(o: Original) -> Any:
    width = 2048 if "conv1.weight" in o.body else VIT["embed_dim"]
    state = {
        **_prefixed("backbone.", o.body),
        **_mlp("projector.", [width, 64, 16], bn=True),
        "classifier.weight": torch.randn(10, width),
        "classifier.bias": torch.randn(10),
        **_prefixed("momentum_backbone.", _plus(o.body)),
        **_mlp("momentum_projector.", [width, 64, 16], bn=True),
    }
    return {
        "epoch": 400,
        "global_step": 12000,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": state,
        "optimizer_states": [_optimizer()],
        "lr_schedulers": [{"last_epoch": 400, "base_lrs": [0.3]}],
    }


def lightly_sequential(o: Original) -> Any:
    seq = _sequential(o.net)
    state = {
        **_prefixed("backbone.", seq),
        **_mlp("projection_head.layers.", [2048, 64, 16]),
        **_prefixed("backbone_momentum.", _plus(seq)),
        **_mlp("projection_head_momentum.layers.", [2048, 64, 16]),
    }
    return {"epoch": 10, "state_dict": state}


def lightly_named(o: Original) -> Any:
    return {
        **_prefixed("backbone.", o.body),
        **_mlp("projection_head.layers.", [2048, 16]),
        **_mlp("prediction_head.layers.", [16, 16]),
    }


def detectron2(o: Original) -> Any:
    """MoCo's detection/convert-pretrain-to-detectron2.py, rule for rule, on a MoCo v2 file."""
    obj = moco_v2(o)["state_dict"]
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = v
    return {"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}


def mae(o: Original) -> Any:
    width = VIT["embed_dim"]
    model = {
        **o.body,
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, width),
        "decoder_embed.bias": torch.randn(16),
        "decoder_pos_embed": torch.zeros(1, 5, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(768, 16),
    }
    return {
        "model": model,
        "optimizer": _optimizer(),
        "epoch": 799,
        "scaler": {"scale": 1024.0},
        "args": argparse.Namespace(model="mae_vit_small"),
    }


# --------------------------------------------------------------------------- saving


def save(tree: Any, path: Path, how: str) -> Path:
    if how == "safetensors":
        save_file({k: v.contiguous() for k, v in tree.items()}, str(path))
    elif how == "legacy":  # torch < 1.6 files (MoCo v1/v2's releases)
        torch.save(tree, path, _use_new_zipfile_serialization=False)
    elif how == "pickle":  # detectron2: numpy arrays in a plain pickle
        numpy = {**tree, "model": {k: v.numpy() for k, v in tree["model"].items()}}
        path.write_bytes(pickle.dumps(numpy, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        torch.save(tree, path)
    return path


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    write: Callable[[Original], Any]
    how: str
    file: str
    format: str
    options: tuple[tuple[str, Any], ...] = ()


CASES = [
    Case("torchvision", "resnet", lambda o: o.net.state_dict(), "torch", "r50.pth", "torchvision"),
    Case(
        "torchvision-ddp",
        "resnet",
        lambda o: {"state_dict": _prefixed("module.", o.net.state_dict())},
        "torch",
        "ddp.pth.tar",
        "torchvision",
    ),
    Case(
        "simclr-converter",
        "resnet",
        lambda o: {"state_dict": o.net.state_dict()},
        "torch",
        "resnet50-1x.pth",
        "torchvision",
    ),
    Case(
        "torchvision-safetensors",
        "resnet",
        lambda o: o.net.state_dict(),
        "safetensors",
        "r50.safetensors",
        "torchvision",
    ),
    Case("moco-v1", "resnet", moco_v1, "legacy", "moco_v1_200ep_pretrain.pth.tar", "moco"),
    Case("moco-v2", "resnet", moco_v2, "legacy", "moco_v2_800ep_pretrain.pth.tar", "moco"),
    Case(
        "moco-v3-resnet",
        "resnet",
        lambda o: moco_v3(o, "fc."),
        "torch",
        "r-50-1000ep.pth.tar",
        "mocov3",
    ),
    Case(
        "dino-resnet",
        "resnet",
        lambda o: dino(o, "module.backbone."),
        "torch",
        "checkpoint.pth",
        "dino",
    ),
    Case("swav", "resnet", swav, "torch", "swav_800ep_pretrain.pth.tar", "swav"),
    Case(
        "swav-unprefixed",
        "resnet",
        lambda o: {"epoch": 5, "state_dict": {k[7:]: v for k, v in swav(o).items()}},
        "torch",
        "ckp-5.pth",
        "swav",
    ),
    Case("byol-sthalles", "resnet", byol_sthalles, "torch", "model.pth", "prefixed"),
    Case("byol-lucidrains", "resnet", byol_lucidrains, "torch", "byol.pt", "prefixed"),
    Case("vissl", "resnet", vissl, "torch", "model_final_checkpoint_phase199.torch", "vissl"),
    Case("vissl-flat", "resnet", vissl_flat, "torch", "converted_vissl.pth", "vissl"),
    Case("mmselfsup", "resnet", mmselfsup, "torch", "mocov2_resnet50_8xb32.pth", "mmpretrain"),
    Case("solo-learn", "resnet", solo_learn, "torch", "byol-imagenet.ckpt", "solo-learn"),
    Case("lightly-sequential", "resnet", lightly_sequential, "torch", "lightly.ckpt", "lightly"),
    Case("lightly-named", "resnet", lightly_named, "torch", "lightly_named.pth", "lightly"),
    Case("detectron2", "resnet", detectron2, "pickle", "moco_v2.pkl", "detectron2"),
    Case("timm", "vit", lambda o: o.net.state_dict(), "safetensors", "model.safetensors", "timm"),
    Case("timm-model", "vit", lambda o: {"model": o.net.state_dict()}, "torch", "deit.pth", "timm"),
    Case("dino-vit", "vit", lambda o: dino(o, "backbone."), "torch", "checkpoint.pth", "dino"),
    Case(
        "moco-v3-vit",
        "vit",
        lambda o: moco_v3(o, "head."),
        "torch",
        "vit-s-300ep.pth.tar",
        "mocov3",
        (("num_heads", 2),),
    ),
    Case("mae", "vit", mae, "torch", "mae_pretrain.pth", "mae"),
    Case("mmpretrain-vit", "vit", mmpretrain_vit, "torch", "mae_vit-base-p16.pth", "mmpretrain"),
    Case("solo-learn-vit", "vit", solo_learn, "torch", "dino-vit.ckpt", "solo-learn"),
]


def _original(request: pytest.FixtureRequest, family: str) -> Original:
    return request.getfixturevalue("resnet" if family == "resnet" else "vit")


def _write(case: Case, o: Original, tmp_path: Path) -> Path:
    return save(case.write(o), tmp_path / case.file, case.how)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_format_imports_with_the_original_features(case, request, tmp_path):
    o = _original(request, case.family)
    path = _write(case, o, tmp_path)
    imported = import_checkpoint(path, input_size=RSIDE, **dict(case.options))
    assert imported.card["format"] == case.format and imported.card["family"] == case.family
    state = imported.encoder.state_dict()
    assert set(state) == set(o.body)
    for key, value in o.body.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        features = imported.encoder.extract(o.x, list(o.features))
        head = imported.encoder(o.x)
    for name, want in o.features.items():
        assert torch.equal(features[name], want), name
    assert torch.equal(head, o.head)
    text = show_keys(path)
    assert f"{case.format} format" in text and ", 0 unknown" in text


def test_dino_student_is_the_other_branch(vit, tmp_path):
    path = save(dino(vit, "backbone."), tmp_path / "checkpoint.pth", "torch")
    student = import_checkpoint(path, branch="student")
    assert student.card["branch"] == "student"
    shifted = _plus(vit.body)
    assert all(torch.equal(student.encoder.state_dict()[k], v) for k, v in shifted.items())
    assert import_checkpoint(path).card["branch"] == "teacher"


def test_key_maps_print_every_renaming(resnet, vit, tmp_path):
    moco = map_keys(moco_v2(resnet), "moco.pth")
    text = format_key_map(moco)
    assert re.search(r"module\.encoder_q\.conv1\.weight +-> conv1\.weight", text)
    assert re.search(r"module\.encoder_q\.fc\.2\.bias +\[dropped: head\]", text)
    assert re.search(r"module\.encoder_k\.conv1\.weight +\[dropped: not the encoder\]", text)
    assert re.search(r"module\.queue_ptr +\[dropped: not the encoder\]", text)
    pairs = dict(map_keys(detectron2(resnet), "d2.pkl").pairs())
    assert pairs["stem.conv1.norm.running_var"] == "bn1.running_var"
    assert pairs["res2.0.conv3.norm.weight"] == "layer1.0.bn3.weight"
    assert pairs["res2.0.shortcut.weight"] == "layer1.0.downsample.0.weight"
    assert pairs["res2.0.shortcut.norm.bias"] == "layer1.0.downsample.1.bias"
    assert pairs["res5.0.conv2.weight"] == "layer4.0.conv2.weight"
    mm = dict(map_keys(mmpretrain_vit(vit), "mm.pth").pairs())
    assert mm["backbone.layers.3.ffn.layers.0.0.weight"] == "blocks.3.mlp.fc1.weight"
    assert mm["backbone.ln1.bias"] == "norm.bias"
    assert mm["backbone.patch_embed.projection.weight"] == "patch_embed.proj.weight"
    seq = dict(map_keys(lightly_sequential(resnet), "l.ckpt").pairs())
    assert seq["backbone.4.1.conv2.weight"] == "layer1.1.conv2.weight"
    assert seq["backbone.1.running_mean"] == "bn1.running_mean"
    for fmt in FORMATS:
        rules = describe_format(fmt)
        assert rules.startswith(fmt.name + ":")
        assert all((p or "(none)") in rules for p in fmt.prefixes)


@torch.no_grad()
def test_full_size_key_maps_on_the_meta_device():
    """Every layout of a real ResNet-50 / ViT-S/16 maps onto exactly the encoder's keys; a
    MoCo v3 ViT-S gets its writer's 12 heads, a DINO or timm one timm's 6."""
    vm = vit_module()
    with torch.device("meta"):
        r50 = torchvision.models.resnet50(weights=None).eval()
        want_r = set(ResNetEncoder().state_dict())
        vits = vm.VisionTransformer(num_classes=1000, embed_dim=384, num_heads=6)
        want_v = set(vm.vit_small().state_dict())
    big = {
        "resnet": Original(
            r50,
            {k: v for k, v in r50.state_dict().items() if not k.startswith("fc.")},
            {},
            torch.empty(0),
            torch.empty(0),
        ),
        "vit": Original(
            vits,
            {k: v for k, v in vits.state_dict().items() if not k.startswith("head.")},
            {},
            torch.empty(0),
            torch.empty(0),
        ),
    }
    for case in CASES:
        km = map_keys(case.write(big[case.family]), case.file)
        assert km.format.name == case.format, case.name
        assert {t for _, t in km.pairs()} == (want_r if case.family == "resnet" else want_v)
        spec = encoder_spec(km)
        if case.family == "resnet":
            assert spec["config"]["layers"] == [3, 4, 6, 3], case.name
        else:
            heads = 12 if case.format == "mocov3" else 6
            assert spec["config"]["num_heads"] == heads, case.name
            assert spec["config"]["img_size"] == 224 and spec["config"]["depth"] == 12
