"""Table 1 evaluation (`bench inpaint evaluate`) and the Figure 6 / Figure 8 PNGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain.inpainting.evaluate as inpaint_eval
from benchmark.errors import ConfigError
from benchmark.runs import open_run
from pretrain.inpainting.config import InpaintEvalConfig
from pretrain.inpainting.evaluate import main
from pretrain.inpainting.figures import make_figures
from pretrain.inpainting.model import FILL, ContextEncoderGenerator, HoleGeometry
from pretrain.inpainting.weights import card_geometry, load_generator
from weights.generator import write_generator


def evaluate(path: Path, cfg: InpaintEvalConfig) -> dict:
    run = open_run(path, cfg)
    try:
        return main(cfg, run)
    finally:
        run.close()


def _weights(
    folder: Path, loss: str, bottleneck: int = 32, seed: int = 0, hole: str | None = None
) -> Path:
    """A generator file; hole None writes a card from before `hole` existed (overlap 4)."""
    torch.manual_seed(seed)
    card = {"method": "inpainting", "loss": loss, "overlap": 4, "iterations": 1}
    if hole is not None:
        card["hole"] = hole
    g = ContextEncoderGenerator(bottleneck, card_geometry(card).prediction.size)
    g(torch.rand(4, 3, 128, 128) * 2 - 1)  # move the BatchNorm running statistics
    folder.mkdir(parents=True)
    write_generator(folder / "generator.safetensors", g.state_dict(), card)
    return folder


def _held_out(folder: Path, n: int, size: int = 160) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 20, 3), np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


def _independent(weights: Path, image: Path) -> tuple[float, float, float]:
    """Table 1 errors of one image recomputed from scratch (numpy, float64)."""
    arr = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64)
    h, w = arr.shape[:2]
    top, left = (h - 128) // 2, (w - 128) // 2
    crop = arr[top : top + 128, left : left + 128] / 127.5 - 1.0
    ctx = crop.copy()
    ctx[36:92, 36:92] = np.array(FILL)  # overlap 4: 56x56 hole
    g, _ = load_generator(weights)
    with torch.no_grad():
        x = torch.from_numpy(ctx).permute(2, 0, 1)[None].float()
        pred = g(x)[0].permute(1, 2, 0).double().numpy()
    d = pred - crop[32:96, 32:96]
    mse255 = np.mean((d * 127.5) ** 2)
    return np.abs(d).mean(), (d**2).mean(), 20 * np.log10(255 / np.sqrt(mse255))


def test_evaluate_matches_independent_computation(tmp_path):
    """An old generator file (card without `hole`) loads and evaluates as hole "code"."""
    weights = _weights(tmp_path / "w", "joint")
    data = _held_out(tmp_path / "held", 3)
    cfg = InpaintEvalConfig(data=str(data), weights=str(weights), device="cpu", eval_crop="centre")
    metrics = evaluate(tmp_path / "eval", cfg)
    assert metrics["stage"] == "inpaint-eval" and metrics["method"] == "context-encoder-joint"
    assert metrics["images"] == 3 and "centre 128" in metrics["crop"]
    assert metrics["hole"] == "code" and metrics["scored_region"] == "prediction"
    assert metrics["overlap"] == 4 and metrics["prediction_size"] == 64
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_image.csv")))
    assert [r["image"] for r in rows] == ["000.png", "001.png", "002.png"]
    ref = np.array([_independent(weights, data / r["image"]) for r in rows])
    got = np.array([[float(r["l1"]), float(r["l2"]), float(r["psnr"])] for r in rows])
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    np.testing.assert_allclose(
        [metrics["mean_l1"], metrics["mean_l2"], metrics["psnr"]], ref.mean(axis=0), rtol=1e-4
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 3


def test_old_generator_file_loads_as_code_and_a_paper_card_as_paper(tmp_path):
    old, _ = load_generator(_weights(tmp_path / "old", "l2"))
    assert old.output_size == 64 and old(torch.zeros(1, 3, 128, 128)).shape[-1] == 64
    paper, card = load_generator(_weights(tmp_path / "paper", "l2", hole="paper"))
    assert card["hole"] == "paper" and paper(torch.zeros(1, 3, 128, 128)).shape[-1] == 72
    assert card_geometry({}) == HoleGeometry("code", 7)
    assert card_geometry({"hole": "paper", "overlap": 4}, overlap=7) == HoleGeometry("paper", 7)


def test_generator_saved_with_a_first_conv_bias_loads_with_it(tmp_path):
    """bench once gave the encoder's first conv a bias (the released one has none)."""
    torch.manual_seed(0)
    g = ContextEncoderGenerator(16, 64, conv1_bias=True).eval()
    torch.nn.init.uniform_(g.encoder.net[0].bias)
    card = {"method": "inpainting", "loss": "l2", "hole": "code", "overlap": 4}
    write_generator(tmp_path / "generator.safetensors", g.state_dict(), card)
    loaded, _ = load_generator(tmp_path)
    assert torch.equal(loaded.encoder.net[0].bias, g.encoder.net[0].bias)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), g(x))
    assert ContextEncoderGenerator(16).encoder.net[0].bias is None


@pytest.mark.parametrize("hole", ["code", "paper"])
def test_evaluation_scores_the_stated_region(tmp_path, monkeypatch, hole):
    """Predictions equal to the truth inside the 64x64 hole, wrong on the ring: the paper's
    reading scores the hole only (zero error); the code's scores its 64x64 prediction, whose
    ring is the 4-px band around its 56x56 hole (nonzero error)."""
    weights = _weights(tmp_path / "w", "joint", hole=hole)
    data = _held_out(tmp_path / "held", 2)
    geometry = HoleGeometry("paper", 4)  # the 64x64 hole; its ring lies outside [32, 96)
    if hole == "code":
        geometry = HoleGeometry("code", 4)  # the ring [32, 36) etc. lies inside [32, 96)

    def perfect_in_the_hole(generator, images, geo, batch_size=32, device="cpu"):
        assert geo == geometry
        pred = geo.predicted(images).clone()
        ring = ~geo.predicted(geo.hole_mask()).expand_as(pred)
        pred[ring] = -pred[ring]  # wrong everywhere but in the hole
        return pred

    monkeypatch.setattr(inpaint_eval, "predict", perfect_in_the_hole)
    cfg = InpaintEvalConfig(data=str(data), weights=str(weights), device="cpu")
    metrics = evaluate(tmp_path / "eval", cfg)
    assert metrics["hole"] == hole
    assert metrics["geometry"] == geometry.label()  # the report's label of the row
    assert metrics["geometry"].endswith(f"scored on the 64x64 {geometry.scored_region}")
    if hole == "paper":
        assert metrics["scored_region"] == "hole" and metrics["prediction_size"] == 72
        assert metrics["mean_l1"] == 0.0 and metrics["mean_l2"] == 0.0
        assert metrics["psnr"] == 100.0
    else:
        assert metrics["scored_region"] == "prediction" and metrics["prediction_size"] == 64
        assert metrics["mean_l1"] > 0.01 and metrics["psnr"] < 100.0


@pytest.mark.parametrize("hole", ["code", "paper"])
def test_nn_hog_on_its_own_training_images_is_perfect(tmp_path, hole):
    data = _held_out(tmp_path / "held", 3, size=128)
    cfg = InpaintEvalConfig(
        data=str(data), baseline="nn-hog", train_data=str(data), device="cpu", overlap=7,
        hole=hole,
    )  # fmt: skip
    metrics = evaluate(tmp_path / "eval", cfg)
    assert metrics["method"] == "nn-hog" and metrics["hole"] == hole
    assert metrics["mean_l1"] == 0.0 and metrics["mean_l2"] == 0.0 and metrics["psnr"] == 100.0


def test_bad_config_is_one_line_error(tmp_path):
    cfg = InpaintEvalConfig(baseline="nn-ce")
    with pytest.raises(ConfigError, match="weights"):
        evaluate(tmp_path / "e", cfg)


def test_paris_streetview_evaluation(tmp_path, shared_data):
    paris = shared_data / "ParisStreetView"
    if not paris.is_dir():
        pytest.skip("ParisStreetView sample not available")
    weights = _weights(tmp_path / "w", "l2")
    cfg = InpaintEvalConfig(data=str(paris), weights=str(weights), device="cpu")
    metrics = evaluate(tmp_path / "eval", cfg)
    assert metrics["images"] == 20
    assert 0 < metrics["mean_l2"] < 4 and 0 < metrics["psnr"] < 100


def test_figures_open_with_expected_grid(tmp_path):
    # a paper-hole joint run (its geometry also drives the baselines) and an old l2 card
    runs = [
        _weights(tmp_path / "joint", "joint", hole="paper"),
        _weights(tmp_path / "l2", "l2", seed=1),
    ]
    held = _held_out(tmp_path / "held", 3)
    train = _held_out(tmp_path / "train", 7, size=130)
    paths = make_figures(runs, str(held), str(train), None, images=2, out=tmp_path / "fig", k=3)
    names = [p.name for p in paths]
    assert names == ["figure6.png", "figure8_ce.png", "figure8_hog.png"]
    with Image.open(paths[0]) as im:  # input, l2, joint, nn-hog, nn-ce: 5 columns, 2 rows
        assert im.size == (5 * 130 + 2, 2 * 130 + 2)
    legend = json.loads((tmp_path / "fig" / "figure6.json").read_text())
    assert legend["columns"][0] == "input" and legend["columns"][1].startswith("l2")
    assert legend["columns"][-2:] == ["nn-hog", "nn-ce"]
    for p in paths[1:]:
        with Image.open(p) as im:  # truth + 3 neighbours, 64 px cells
            assert im.size == (4 * 66 + 2, 2 * 66 + 2)
