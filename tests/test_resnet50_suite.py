"""configs/resnet50.yaml: a ResNet-50 checkpoint through every VOC protocol at the
protocols' values, only paths filled in: `--print-config` lists no departure."""

from __future__ import annotations

from pathlib import Path

import yaml

SUITE = Path(__file__).resolve().parents[1] / "configs" / "resnet50.yaml"


def test_the_resnet50_suite_departs_in_nothing(tmp_path, capsys):
    from bench import cli

    assert cli.main(["run", str(SUITE), "--print-config", "--out", str(tmp_path)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["step"] for d in docs] == [f"{t}-mocov2-s0" for t in
                                         ("svm", "knn", "classification", "detection",
                                          "segmentation")]  # fmt: skip
    assert all(d["departures"] == [] for d in docs)
    det = next(d for d in docs if d["step"] == "detection-mocov2-s0")["config"]
    assert det["weights"].endswith("moco_v2_800ep_pretrain.pth.tar")
    frcnn = det["faster_rcnn"]
    assert frcnn["train_sets"] == ["2007:trainval", "2012:trainval"]
    assert (frcnn["train"]["iterations"], frcnn["train"]["ims_per_batch"],
            frcnn["train"]["lr"]) == (24000, 16, 0.02)  # fmt: skip
    seg = next(d for d in docs if d["step"] == "segmentation-mocov2-s0")["config"]["fcn_resnet"]
    assert (seg["train"]["iterations"], seg["train"]["batch_size"], seg["crop_size"]) == (
        20000, 16, 512)  # fmt: skip
