"""Frozen-feature probes: SVM protocol against scikit-learn run directly, cost selection,
low-shot sampling, AP, k-NN, layer taps and pooling, the feature cache."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV
from sklearn.svm import LinearSVC

from benchmark.datasets.voc import VOC_CLASSES, read_class_files
from benchmark.errors import DatasetError
from benchmark.metrics import classification_ap
from transfer.probes.features import (
    LayerTaps,
    extract_features,
    layer_specs,
    load_split,
    pool_spec,
    scale_shorter,
    tap_indices,
)
from transfer.probes.knn import knn_scores
from transfer.probes.svm import (
    SVMParams,
    _draw_seed,
    low_shot,
    low_shot_sample,
    reference_ap,
    train_svms,
)
from weights.encoder import load_encoder

# --------------------------------------------------------------------------- helpers

LIB = SVMParams(solver="liblinear")  # the reference path, compared with sklearn to 1e-12


def make_problem(seed=0, n_train=120, n_test=90, dim=24, classes=4, signal=1.5):
    """Features with a class signal in the first `classes` dims, labels, difficult flags."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = (rng.random((n, classes)) < 0.3).astype(np.float32)
        labels[:4] = np.eye(classes, dtype=np.float32)[np.arange(4) % classes]  # >= 1 each
        labels[4:8] = labels[:4]
        labels[8:12] = labels[:4]
        difficult = (rng.random((n, classes)) < 0.08) & (labels == 0)
        x = rng.normal(size=(n, dim))
        x[:, :classes] += signal * labels
        return x.astype(np.float32), labels, difficult

    return split(n_train), split(n_test)


def normalise(x):
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


def reference_svc(cost, seed=0):
    """The LinearSVC of fair_self_supervision_benchmark's train_svm_kfold.py."""
    return LinearSVC(
        C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
        loss="squared_hinge", tol=0.0001, dual=True, max_iter=2000, random_state=seed,
    )  # fmt: skip


def loop_ap(labels, scores):
    """svm_helper.get_precision_recall + calculate_ap, written out (distinct scores)."""
    order = np.argsort(-scores)
    pos = (labels[order] > 0).astype(float)
    tp, fp = np.cumsum(pos), np.cumsum(1 - pos)
    rec, prec = tp / pos.sum(), tp / (tp + fp)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in np.where(mrec[1:] != mrec[:-1])[0] + 1:
        ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


# --------------------------------------------------------------------------- AP


def test_reference_ap_is_the_interpolated_area_and_not_sklearn():
    rng = np.random.default_rng(3)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = rng.normal(size=200) + labels
    ours = reference_ap(labels, scores)
    assert ours == pytest.approx(loop_ap(labels, scores), abs=1e-12)
    sk = average_precision_score(labels, scores)
    assert ours > sk  # the envelope never lowers precision; here it raises it
    # all tied: one threshold, precision = positive rate at recall 1
    assert reference_ap(labels, np.zeros(200)) == pytest.approx(labels.mean())
    assert np.isnan(reference_ap(np.zeros(5), np.arange(5.0)))


# --------------------------------------------------------------------------- SVM


def test_svm_settings_are_the_reference():
    assert SVMParams().make(0.25).get_params() == reference_svc(0.25).get_params()


@pytest.mark.parametrize("difficult_as", ["negative", "ignore"])
def test_svm_map_equals_sklearn_run_directly(difficult_as):
    (xtr, ytr, dtr), (xte, yte, dte) = make_problem(0)
    cost = 0.5
    result = train_svms(xtr, ytr, dtr, xte, yte, dte, costs=[cost], folds=3,
                        difficult_as=difficult_as, params=LIB)  # fmt: skip
    xtr_n, xte_n = normalise(xtr), normalise(xte)
    sk, ref = [], []
    for c in range(ytr.shape[1]):
        rows = np.ones(len(ytr), bool) if difficult_as == "negative" else ~dtr[:, c]
        y = np.where(ytr[rows, c] == 1, 1, -1)
        clf = reference_svc(cost).fit(xtr_n[rows], y)
        s = clf.decision_function(xte_n)
        keep = ~dte[:, c]
        np.testing.assert_allclose(result.scores[:, c], s, rtol=0, atol=1e-12)
        sk.append(average_precision_score(yte[keep, c], s[keep]))
        ref.append(loop_ap(yte[keep, c], s[keep]))
    np.testing.assert_allclose(result.per_class["sklearn"], sk, atol=1e-12)
    np.testing.assert_allclose(result.per_class["reference"], ref, atol=1e-12)
    assert result.mean("sklearn") == pytest.approx(np.mean(sk), abs=1e-12)
    # the project's metric on the same scores gives the same sklearn numbers
    per_class, mean = classification_ap(result.scores, yte, dte)
    np.testing.assert_allclose(per_class, sk, atol=1e-12)


def test_cross_validation_picks_the_cost_grid_search_picks():
    (xtr, ytr, dtr), (xte, yte, dte) = make_problem(1, signal=0.8)
    costs = [1e-4, 1e-2, 0.1, 1.0, 10.0, 0.0625]
    result = train_svms(xtr, ytr, dtr, xte, yte, dte, costs=costs, folds=3, params=LIB)
    xtr_n, xte_n = normalise(xtr), normalise(xte)
    for c in range(ytr.shape[1]):
        y = np.where(ytr[:, c] == 1, 1, -1)
        # cross_val_score(cv=3, scoring='average_precision') for each cost is exactly this
        grid = GridSearchCV(reference_svc(1.0), {"C": costs}, cv=3, scoring="average_precision")
        grid.fit(xtr_n, y)
        assert result.costs[c] == grid.best_params_["C"]
        np.testing.assert_allclose(result.cv_ap[c], grid.cv_results_["mean_test_score"],
                                   atol=1e-12)  # fmt: skip
        s = grid.best_estimator_.decision_function(xte_n)
        keep = ~dte[:, c]
        assert result.per_class["sklearn"][c] == pytest.approx(
            average_precision_score(yte[keep, c], s[keep]), abs=1e-12
        )
    assert len(set(result.costs)) > 1 or result.costs[0] != costs[0]  # the grid matters


def test_svm_parallel_equals_sequential():
    (xtr, ytr, dtr), (xte, yte, dte) = make_problem(2, n_train=60, n_test=40)
    kw = dict(costs=[0.01, 1.0], folds=3, params=LIB)
    one = train_svms(xtr, ytr, dtr, xte, yte, dte, n_jobs=1, **kw)
    two = train_svms(xtr, ytr, dtr, xte, yte, dte, n_jobs=2, **kw)
    np.testing.assert_array_equal(one.scores, two.scores)
    assert one.costs == two.costs


def test_label_features_reach_one_and_constant_features_chance():
    (xtr, ytr, dtr), (xte, yte, dte) = make_problem(4)
    rng = np.random.default_rng(0)
    enc_tr = np.hstack([ytr * 5.0, 0.01 * rng.random((len(ytr), 8))])
    enc_te = np.hstack([yte * 5.0, 0.01 * rng.random((len(yte), 8))])
    good = train_svms(enc_tr, ytr, dtr, enc_te, yte, dte, costs=[0.1, 1.0], params=LIB)
    assert good.mean("reference") > 0.99 and good.mean("sklearn") > 0.99
    const = train_svms(np.ones_like(enc_tr), ytr, dtr, np.ones_like(enc_te), yte, dte,
                       costs=[0.1, 1.0], params=LIB)  # fmt: skip
    rate = [yte[~dte[:, c], c].mean() for c in range(yte.shape[1])]
    np.testing.assert_allclose(const.per_class["sklearn"], rate, atol=1e-12)
    np.testing.assert_allclose(const.per_class["reference"], rate, atol=1e-12)


def test_class_without_enough_positives_errors_or_is_skipped():
    (xtr, ytr, dtr), (xte, yte, dte) = make_problem(5, n_train=40)
    ytr[:, 1] = 0
    ytr[0, 1] = 1
    with pytest.raises(DatasetError, match="class 1: 1 positive"):
        train_svms(xtr, ytr, dtr, xte, yte, dte, costs=[1.0], folds=3)
    res = train_svms(xtr, ytr, dtr, xte, yte, dte, costs=[1.0], folds=3, on_bad_data="skip")
    assert "1" in res.skipped and np.isnan(res.per_class["reference"][1])
    assert res.costs[1] is None and not np.isnan(res.per_class["reference"][0])


# --------------------------------------------------------------------------- low shot


def reference_sampler(targets, k, seed_int, num_classes):
    """create_voc_low_shot_samples.py's generate_independent_sample for one (sample, k),
    with the module-level `random` seeded."""
    random.seed(seed_int)
    output = np.ones(targets.shape, dtype=np.int32) * -1

    def sample_symbol(symbol, num):
        for idx in range(targets.shape[1]):
            symbol_data = np.where(targets[:, idx] == symbol)[0]
            for index in random.sample(list(symbol_data), num):
                output[index, idx] = symbol

    sample_symbol(1, k)
    sample_symbol(0, (num_classes - 1) * k)
    return output


def test_low_shot_sampler_is_the_reference_deterministic_and_skips_difficult():
    rng = np.random.default_rng(0)
    n, classes = 400, 5
    targets = (rng.random((n, classes)) < 0.25).astype(np.int8)
    targets[(rng.random((n, classes)) < 0.1) & (targets == 0)] = -1  # difficult only
    for k in (1, 4, 8):
        a, skipped = low_shot_sample(targets, k, draw=0, seed=7)
        assert not skipped
        np.testing.assert_array_equal(a, low_shot_sample(targets, k, draw=0, seed=7)[0])
        np.testing.assert_array_equal(
            a, reference_sampler(targets, k, _draw_seed(7, 0, k), classes)
        )
        assert not np.array_equal(a, low_shot_sample(targets, k, draw=1, seed=7)[0])
        assert not np.array_equal(a, low_shot_sample(targets, k, draw=0, seed=8)[0])
        assert ((a == 1).sum(0) == k).all()
        assert ((a == 0).sum(0) == (classes - 1) * k).all()
        assert (targets[a == 1] == 1).all() and (targets[a == 0] == 0).all()
        assert not (a[targets == -1] != -1).any()  # a difficult image is never drawn


def test_low_shot_sampler_too_few_images():
    targets = np.zeros((30, 3), dtype=np.int8)
    targets[:5, 0] = 1
    targets[:20, 1] = 1
    targets[:20, 2] = 1
    with pytest.raises(DatasetError, match="class 0 has 5 positive"):
        low_shot_sample(targets, 8, 0)
    out, skipped = low_shot_sample(targets, 8, 0, negatives_per_positive=1, on_bad_data="skip")
    assert set(skipped) == {"0"} and (out[:, 0] == -1).all()
    assert ((out[:, 1:] == 1).sum(0) == 8).all() and ((out[:, 1:] == 0).sum(0) == 8).all()


def test_low_shot_table_is_deterministic_and_uses_the_best_mean_cost():
    (xtr, ytr, dtr), (xte, yte, dte) = make_problem(6, n_train=200)
    targets = ytr.astype(np.int8)
    targets[dtr] = -1
    kw = dict(sizes=[1, 4], draws=3, costs=[0.01, 1.0], seed=0, negatives_per_positive=3,
              params=LIB)  # fmt: skip
    a = low_shot(xtr, targets, xte, yte, dte, **kw)
    b = low_shot(xtr, targets, xte, yte, dte, n_jobs=2, **kw)
    assert a == b
    for k in ("1", "4"):
        entry = a[k]
        assert len(entry["draws"]) == 3 and entry["classes"] == 4
        assert entry["mean"] == pytest.approx(np.mean(entry["draws"]))
        assert entry["std"] == pytest.approx(np.std(entry["draws"]))
    # one draw by hand: SVMs on the drawn images, reference AP on the test set
    sample, _ = low_shot_sample(targets, 4, 0, 0, 3)
    xtr_n, xte_n = normalise(xtr), normalise(xte)
    per_cost = []
    for cost in (0.01, 1.0):
        aps = []
        for c in range(4):
            rows = sample[:, c] != -1
            y = np.where(sample[rows, c] == 1, 1, -1)
            s = reference_svc(cost).fit(xtr_n[rows], y).decision_function(xte_n)
            keep = ~dte[:, c]
            aps.append(loop_ap(yte[keep, c], s[keep]))
        per_cost.append(np.mean(aps))
    assert per_cost[[0.01, 1.0].index(a["4"]["cost"])] == pytest.approx(a["4"]["draws"][0])


# --------------------------------------------------------------------------- k-NN


def test_knn_scores_match_a_direct_computation():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(50, 6)), rng.normal(size=(7, 6))
    labels = (rng.random((50, 3)) < 0.4).astype(np.float32)
    got = knn_scores(train, labels, test, k=5, temperature=0.1)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    for i, q in enumerate(test):
        sim = tn @ (q / np.linalg.norm(q))
        top = np.argsort(-sim)[:5]
        want = (np.exp(sim[top] / 0.1)[:, None] * labels[top]).sum(0)
        np.testing.assert_allclose(got[i], want, rtol=1e-5)
    assert knn_scores(train, labels, test, k=500).shape == (7, 3)  # k clamped to N


def test_knn_on_label_features_is_perfect():
    (_, ytr, _), (_, yte, dte) = make_problem(7)
    rng = np.random.default_rng(1)
    # the labels plus a constant dimension (images without a label point along it)
    ftr = np.hstack([ytr, np.full((len(ytr), 1), 0.3)]) + 0.01 * rng.random((len(ytr), 5))
    fte = np.hstack([yte, np.full((len(yte), 1), 0.3)]) + 0.01 * rng.random((len(yte), 5))
    _, mean = classification_ap(knn_scores(ftr, ytr, fte, k=10), yte, dte)
    assert mean > 0.99


# --------------------------------------------------------------------------- taps, pooling


def test_pooling_is_the_reference_at_227():
    torch.manual_seed(0)
    encoder, _ = load_encoder(None, "caffenet")
    specs = layer_specs(encoder, ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"], 227)
    assert {n: s.dim for n, s in specs.items()} == {
        "conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216,
        "pool5": 9216,
    }  # fmt: skip
    assert [(specs[n].kernel, specs[n].stride) for n in ("conv1", "conv2", "conv3", "conv5")] == [
        (19, 4), (12, 3), (9, 1), (8, 1)
    ]  # fmt: skip
    assert specs["pool5"].kind == "none"
    # another size: adaptive pooling to round(sqrt(9216 / C))
    assert pool_spec("conv1", 64, 56).grid == 12 and pool_spec("conv1", 64, 56).dim == 9216
    assert pool_spec("conv3", 384, 7).kind == "adaptive" and pool_spec("conv3", 384, 7).grid == 5


def test_layer_taps_read_after_relu_and_pool():
    torch.manual_seed(0)
    encoder, _ = load_encoder(None, "caffenet")
    encoder.eval()
    for m in encoder.features:  # make every layer matter
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    x = torch.randn(2, 3, 99, 99)
    layers = ["conv1", "conv3", "pool5"]
    specs = layer_specs(encoder, layers, 99)
    taps = LayerTaps(encoder.features, specs)
    with torch.no_grad():
        out = taps(x.clone())
        idx = tap_indices()
        for name in layers:
            fmap = encoder.features[: idx[name] + 1](x.clone())
            assert (fmap >= 0).all()  # after a ReLU / the pooling of ReLU'd maps
            want = F.adaptive_avg_pool2d(fmap, specs[name].grid).flatten(1)
            if specs[name].kind == "none":
                want = fmap.flatten(1)
            torch.testing.assert_close(out[name], want)
        torch.testing.assert_close(out["pool5"], encoder(x.clone()).flatten(1))


def test_scale_shorter_side_as_the_reference():
    img = np.zeros((300, 400, 3), dtype=np.float32)
    assert scale_shorter(img, 256).shape == (256, 341, 3)
    assert scale_shorter(np.zeros((500, 333, 3), np.float32), 256).shape == (384, 256, 3)
    same = np.zeros((256, 300, 3), np.float32)
    assert scale_shorter(same, 256) is same


# --------------------------------------------------------------------------- cache


def test_feature_cache_hit_and_invalidation(synth_root, tmp_path):
    voc = synth_root / "VOCdevkit" / "VOC2007"
    images = load_split(voc, "trainval")
    torch.manual_seed(0)
    encoder, _ = load_encoder(None, "caffenet")
    calls = []
    encoder.features[0].register_forward_hook(lambda *a: calls.append(1))
    kw = dict(input_size=99, batch_size=5, cache_dir=tmp_path / "cache")
    first = extract_features(encoder, images, ["conv2", "pool5"], **kw)
    assert not first.from_cache and calls and first.path.is_file()
    assert first.arrays["conv2"].shape == (len(images), first.specs["conv2"].dim)
    calls.clear()
    second = extract_features(encoder, images, ["pool5", "conv2"], **kw)
    assert second.from_cache and not calls  # no forward pass at all
    for name in ("conv2", "pool5"):
        np.testing.assert_array_equal(first.arrays[name], second.arrays[name])
    assert second.ids == images.ids
    # a fresh encoder holding the same weights hits as well
    twin, _ = load_encoder(None, "caffenet")
    twin.load_state_dict(encoder.state_dict())
    assert extract_features(twin, images, ["conv2", "pool5"], **kw).from_cache
    # another layer set, another image list or changed weights: extracted again
    assert not extract_features(encoder, images, ["pool5"], **kw).from_cache
    assert not extract_features(encoder, images.subset(np.arange(5)), ["pool5"], **kw).from_cache
    with torch.no_grad():
        encoder.features[0].weight[0, 0, 0, 0] += 1.0
    calls.clear()
    third = extract_features(encoder, images, ["conv2", "pool5"], **kw)
    assert not third.from_cache and calls and third.path != first.path


def test_bf16_features_are_their_own_cache_entry_and_close_to_fp32(synth_root, tmp_path):
    """precision bf16 runs the encoder under bf16 autocast: float32 features within bf16's
    rounding of the fp32 ones, cached under their own key, and the precision is reported."""
    voc = synth_root / "VOCdevkit" / "VOC2007"
    images = load_split(voc, "test").subset(np.arange(6))
    torch.manual_seed(2)
    encoder, _ = load_encoder(None, "caffenet")
    kw = dict(input_size=99, batch_size=3, cache_dir=tmp_path / "cache")
    fp32 = extract_features(encoder, images, ["conv1", "pool5"], precision="fp32", **kw)
    bf16 = extract_features(encoder, images, ["conv1", "pool5"], precision="bf16", **kw)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert not bf16.from_cache and bf16.key != fp32.key
    for name in ("conv1", "pool5"):
        a, b = fp32.arrays[name], bf16.arrays[name]
        assert b.dtype == np.float32 and not np.array_equal(a, b)
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    again = extract_features(encoder, images, ["conv1", "pool5"], precision="bf16", **kw)
    assert again.from_cache and again.precision == "bf16"
    np.testing.assert_array_equal(again.arrays["pool5"], bf16.arrays["pool5"])


def test_batching_does_not_change_features(synth_root, tmp_path):
    voc = synth_root / "VOCdevkit" / "VOC2007"
    images = load_split(voc, "test")
    torch.manual_seed(1)
    encoder, _ = load_encoder(None, "caffenet")
    a = extract_features(encoder, images, ["conv5"], input_size=99, batch_size=1,
                         use_cache=False)  # fmt: skip
    b = extract_features(encoder, images, ["conv5"], input_size=99, batch_size=7, workers=1,
                         use_cache=False)  # fmt: skip
    np.testing.assert_allclose(a.arrays["conv5"], b.arrays["conv5"], rtol=1e-4, atol=1e-6)


def test_unreadable_image_errors_or_is_skipped(synth_root, tmp_path):
    import shutil

    voc = tmp_path / "VOC2007"
    shutil.copytree(synth_root / "VOCdevkit" / "VOC2007", voc)
    images = load_split(voc, "test")
    images.paths[2].write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    encoder, _ = load_encoder(None, "caffenet")
    kw = dict(input_size=99, batch_size=4, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match=images.paths[2].name):
        extract_features(encoder, images, ["pool5"], **kw)
    got = extract_features(encoder, images, ["pool5"], on_bad_data="skip", **kw)
    assert len(got.ids) == len(images) - 1 and images.ids[2] not in got.ids
    assert 2 not in got.keep.tolist() and len(got.skipped) == 1


# --------------------------------------------------------------------------- real labels


def test_labels_match_the_reference_class_files(shared_data):
    """The reference reads <class>_<split>.txt (1 / -1 / 0 = difficult only); our labels come
    from the annotations and must say the same."""
    voc = shared_data / "VOCdevkit" / "VOC2007"
    images = load_split(voc, "train")
    ids, files = read_class_files(voc, "train", VOC_CLASSES)
    order = np.argsort(ids)
    assert [ids[i] for i in order] == images.ids
    expected = files[order]
    want = np.where(expected == 1, 1, np.where(expected == 0, -1, 0))
    np.testing.assert_array_equal(images.targets(), want)
    assert (images.targets() == -1).any()  # the sample has difficult-only labels
