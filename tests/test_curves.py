import json

from PIL import Image

from benchmark.curves import read_scalars, write_curves


def test_curves_png_from_scalars(tmp_path):
    rows = [
        {"step": i, "time": 0.0, "train/loss": 1.0 / (i + 1), "train/lr": 0.1} for i in range(5)
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 5, "train/lo'  # torn last line
    (tmp_path / "scalars.jsonl").write_text(text)
    series = read_scalars(tmp_path / "scalars.jsonl")
    assert sorted(series) == ["train/loss", "train/lr"]
    assert series["train/loss"][-1] == (4, 0.2)
    path = write_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    assert Image.open(path).size[0] > 300


def test_no_scalars_no_curves(tmp_path):
    assert write_curves(tmp_path) is None
