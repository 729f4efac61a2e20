"""Proposals: selective search recall and caching, precomputed .mat / detectron2 pickles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.io import savemat

from benchmark.errors import BenchError
from transfer.detection import proposals as P
from transfer.detection.data import load_records
from transfer.detection.sampling import box_iou


@pytest.fixture(scope="module")
def voc(synth_root):
    return synth_root / "VOCdevkit" / "VOC2007"


def test_selective_search_recalls_most_objects(voc, tmp_path):
    records = load_records(voc, "trainval") + load_records(voc, "test")
    boxes = P.selective_search_cached(
        [r.image_id for r in records], [r.path for r in records], tmp_path, min_box=8
    )
    hit = total = 0
    for r, b in zip(records, boxes):
        assert b.dtype == np.float32 and b.shape[1] == 4
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert b.min() >= 0 and (b[:, 2] <= r.width - 1).all() and (b[:, 3] <= r.height - 1).all()
        gt = r.gt_boxes[~r.gt_difficult]
        if len(gt):
            hit += int((box_iou(gt, b).max(axis=1) >= 0.5).sum())
            total += len(gt)
    assert total > 10
    assert hit / total >= 0.7, f"selective search recall {hit}/{total}"


def test_selective_search_is_cached_and_reused(voc, tmp_path, monkeypatch):
    records = load_records(voc, "test")[:3]
    ids, paths = [r.image_id for r in records], [r.path for r in records]
    first = P.selective_search_cached(ids, paths, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def fail(*_a, **_k):
        raise AssertionError("selective search ran again instead of using the cache")

    monkeypatch.setattr(P, "selective_search", fail)
    again = P.selective_search_cached(ids, paths, tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    with pytest.raises(AssertionError):  # other settings are another cache entry
        P.selective_search_cached(ids, paths, tmp_path, max_boxes=5)


def test_selective_search_respects_max_boxes_and_min_size():
    rng = np.random.default_rng(0)
    img = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    img[20:60, 30:80] = (250, 10, 10)
    boxes = P.selective_search(img, max_boxes=7, min_box=10)
    assert 0 < len(boxes) <= 7
    assert ((boxes[:, 2] - boxes[:, 0] + 1 >= 10) & (boxes[:, 3] - boxes[:, 1] + 1 >= 10)).all()


def _ids_boxes():
    ids = ["000001", "000002", "000003"]
    boxes = [
        np.array([[0, 0, 9, 19], [5, 6, 40, 30]], np.float32),
        np.zeros((0, 4), np.float32),
        np.array([[1, 2, 3, 4]], np.float32),
    ]
    return ids, boxes


def _write_mat(path, ids, boxes):
    cell = np.empty((1, len(boxes)), dtype=object)
    for i, b in enumerate(boxes):
        cell[0, i] = (b[:, [1, 0, 3, 2]] + 1).astype(np.float64)  # (y1, x1, y2, x2), 1-based
    names = np.empty((len(ids), 1), dtype=object)
    for i, name in enumerate(ids):
        names[i, 0] = name
    savemat(path, {"boxes": cell, "images": names})


def test_fast_rcnn_mat_file(tmp_path):
    ids, boxes = _ids_boxes()
    path = tmp_path / "voc_2007_test.mat"
    _write_mat(path, ids, boxes)
    loaded = P.load_proposal_file(path, ids)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, boxes))


def test_mat_file_that_does_not_match_the_split_names_file_and_id(tmp_path):
    ids, boxes = _ids_boxes()
    path = tmp_path / "voc_2007_test.mat"
    _write_mat(path, ["000001", "000009", "000003"], boxes)
    with pytest.raises(BenchError) as err:
        P.load_proposal_file(path, ids)
    msg = str(err.value)
    assert str(path) in msg and "'000002'" in msg and "'000009'" in msg and "\n" not in msg
    _write_mat(path, ids[:2], boxes[:2])
    with pytest.raises(BenchError, match="000003"):
        P.load_proposal_file(path, ids)


def test_detectron2_pickle_round_trip_and_mismatch(tmp_path):
    ids, boxes = _ids_boxes()
    path = tmp_path / "props.pkl"
    P.write_detectron2_pickle(path, ids, boxes)
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert raw["bbox_mode"] == 0 and list(raw["ids"]) == ids
    assert np.array_equal(raw["boxes"][0][0], [0, 0, 10, 20])  # continuous x2, y2
    assert (np.diff(raw["objectness_logits"][0]) < 0).all()  # ranked like selective search
    loaded = P.load_proposal_file(path, list(reversed(ids)))  # any order, matched by id
    assert all(np.array_equal(a, b) for a, b in zip(loaded, reversed(boxes)))
    with pytest.raises(BenchError, match=r"props\.pkl.*'000004'"):
        P.load_proposal_file(path, ids + ["000004"])


def test_bad_proposal_files(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        P.load_proposal_file(tmp_path / "missing.mat", ["1"])
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(BenchError, match="unknown proposal file type"):
        P.load_proposal_file(tmp_path / "p.txt", ["1"])
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(BenchError, match="bad.pkl"):
        P.load_proposal_file(tmp_path / "bad.pkl", ["1"])
    savemat(tmp_path / "nobox.mat", {"other": np.zeros(2)})
    with pytest.raises(BenchError, match="no 'boxes'"):
        P.load_proposal_file(tmp_path / "nobox.mat", ["1"])


def test_selective_search_does_not_depend_on_earlier_calls(voc):
    """OpenCV ranks regions with C's rand(): the same image must give the same boxes
    whether or not other images were searched before it in the process."""
    records = load_records(voc, "test")
    from benchmark.datasets.folder import load_rgb

    first = np.asarray(load_rgb(records[0].path))
    other = np.asarray(load_rgb(records[1].path))
    a = P.selective_search(first)
    P.selective_search(other)
    b = P.selective_search(first)
    np.testing.assert_array_equal(a, b)


class _RunsCommand:
    """A pickle payload that would run a shell command when loaded by plain pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


class _CreatesFile:
    """A pickle payload that would create (truncate) a file when loaded by plain pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_proposal_pickle_never_runs_and_is_a_one_line_error(tmp_path):
    """Proposal pickles are read by a restricted unpickler: a crafted file whose objects
    would call os.system or open a file for writing is refused before anything runs."""
    ids, boxes = _ids_boxes()
    marker = tmp_path / "pwned"
    payloads = {
        "system.pkl": _RunsCommand(f"touch {marker}"),  # at the top level
        "nested.pkl": {
            "ids": ids,
            "boxes": [boxes[0], _RunsCommand(f"touch {marker}"), boxes[2]],
            "bbox_mode": 0,
        },  # fmt: skip
        "open.pkl": {"ids": ids, "boxes": boxes, "objectness_logits": _CreatesFile(str(marker))},
        "objects.pkl": {"ids": ids, "boxes": [np.array([_RunsCommand("true")], dtype=object)]},
    }
    for name, payload in payloads.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(payload))
        with pytest.raises(BenchError) as err:
            P.load_proposal_file(path, ids)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg, msg
        assert "not allowed" in msg, msg  # refused, not merely malformed
        assert not marker.exists(), f"{name}: loading the pickle ran its payload"
        if name == "system.pkl":
            assert "system" in msg  # the message names the global it refused
    # genuine detectron2 proposals, numpy arrays inside, still load through the same reader
    P.write_detectron2_pickle(tmp_path / "ok.pkl", ids, boxes)
    assert all(
        np.array_equal(a, b) for a, b in zip(P.load_proposal_file(tmp_path / "ok.pkl", ids), boxes)
    )
