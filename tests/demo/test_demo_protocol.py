"""The <H, S> long-tail split protocol and the data sources of the demo."""

import os

import numpy as np
import pytest
import torch

from feature_cloud.demo.data import (
    SyntheticConfig,
    load_data,
    load_digits,
    load_imagefolder,
    load_market1501,
    make_synthetic,
    synthetic_class_sizes,
)
from feature_cloud.demo.protocol import long_tail_split, rank_classes
from feature_cloud.demo.runner import drop_small_classes


def _labels(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def test_rank_classes_by_count_then_index():
    labels = _labels([3, 7, 7, 1, 5])
    assert rank_classes(labels, 5).tolist() == [1, 2, 4, 0, 3]


@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
def test_exact_counts_per_class(val_fraction):
    sizes = [40, 10, 33, 25, 8, 12, 3, 50]
    labels = _labels(sizes)
    split = long_tail_split(
        labels, 8, num_head=3, tail_shots=5, test_fraction=0.3, val_fraction=val_fraction, seed=7
    )
    # head = the three largest: 50 (7), 40 (0), 33 (2)
    assert sorted(torch.nonzero(split.head).flatten().tolist()) == [0, 2, 7]
    train_c = torch.bincount(labels[split.train], minlength=8)
    test_c = torch.bincount(labels[split.test], minlength=8)
    val_c = torch.bincount(labels[split.val], minlength=8)
    for c, n in enumerate(sizes):
        n_test = max(1, round(0.3 * n))
        n_val = min(round(val_fraction * n), n - n_test - 1)
        pool = n - n_test - n_val
        assert test_c[c] == n_test
        expected_train = pool if split.head[c] else min(5, pool)
        assert train_c[c] == expected_train == split.train_counts[c]
        assert val_c[c] == n - n_test - expected_train  # unused tail pool joins validation
    # the three parts partition the data
    every = torch.cat([split.train, split.val, split.test])
    assert sorted(every.tolist()) == list(range(labels.numel()))
    assert split.total_counts.tolist() == sizes
    assert split.summary()["train_tail"] == int(split.train_counts[~split.head].sum())


def test_split_is_seeded():
    labels = _labels([30, 20, 10, 10])
    a = long_tail_split(labels, 4, 1, 3, seed=1)
    b = long_tail_split(labels, 4, 1, 3, seed=1)
    c = long_tail_split(labels, 4, 1, 3, seed=2)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train)


def test_split_rejects_bad_input():
    labels = _labels([5, 5, 1])
    with pytest.raises(ValueError, match="at least|>= 2 samples"):
        long_tail_split(labels, 3, 1, 2)
    good = _labels([5, 5, 5])
    with pytest.raises(ValueError, match="num_head"):
        long_tail_split(good, 3, 4, 2)
    with pytest.raises(ValueError, match="tail_shots"):
        long_tail_split(good, 3, 1, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        long_tail_split(good, 3, 1, 2, test_fraction=1.0)
    with pytest.raises(TypeError):
        long_tail_split(good.float(), 3, 1, 2)


def test_drop_small_classes_renumbers():
    data = make_synthetic(SyntheticConfig(num_classes=4, max_per_class=6, min_per_class=1))
    sizes = torch.bincount(data.y).tolist()
    assert sizes[-1] == 1
    kept = drop_small_classes(data)
    assert kept.num_classes == 3 and kept.y.max() == 2
    assert torch.bincount(kept.y).tolist() == sizes[:3]


def test_digits_default_split():
    data = load_digits()
    assert data.x.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0
    split = long_tail_split(data.y, 10, 3, 5, seed=0)
    assert int(split.head.sum()) == 3
    assert split.train_counts[~split.head].tolist() == [5] * 7


def test_synthetic_generator_sizes_and_determinism():
    cfg = SyntheticConfig(num_classes=12, max_per_class=40, min_per_class=10, seed=3)
    sizes = synthetic_class_sizes(cfg)
    assert sizes[0] == 40 and sizes[-1] == 10 and np.all(np.diff(sizes) <= 0)
    a, b = make_synthetic(cfg), make_synthetic(cfg)
    assert torch.equal(a.x, b.x) and torch.bincount(a.y).tolist() == sizes.tolist()
    # spread controls the intra-class variance
    tight = make_synthetic(SyntheticConfig(num_classes=12, spread=0.1, noise=0.0))
    loose = make_synthetic(SyntheticConfig(num_classes=12, spread=2.0, noise=0.0))

    def within(d):
        return float(sum(d.x[d.y == c].var(0).sum() for c in range(12)))

    assert within(loose) > 5 * within(tight)
    with pytest.raises(ValueError, match="min_per_class"):
        make_synthetic(SyntheticConfig(min_per_class=50, max_per_class=10))


def _write_png(path, value):
    from PIL import Image

    Image.fromarray(np.full((12, 6, 3), value, dtype=np.uint8)).save(path)


def test_imagefolder_and_market1501_layouts(tmp_path):
    root = tmp_path / "folder"
    for ident, n in (("alice", 3), ("bob", 2)):
        os.makedirs(root / ident)
        for i in range(n):
            _write_png(root / ident / f"{i}.png", 40 * i)
    (root / "notes.txt").write_text("ignored")
    (root / "alice" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata, hidden
    os.makedirs(root / ".cache")  # a hidden folder is no identity, but it is named
    _write_png(root / ".cache" / "0.png", 1)
    with pytest.warns(UserWarning, match=r"left out .*1 hidden folder \(\.cache\)"):
        data = load_imagefolder(str(root), size=(8, 4))
    assert data.x.shape == (5, 3, 8, 4) and data.class_names == ["alice", "bob"]
    assert torch.bincount(data.y).tolist() == [3, 2]
    (root / "bob" / "broken.jpg").write_bytes(b"not a jpeg")  # named, not a traceback
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        load_imagefolder(str(root), size=(8, 4))

    market = tmp_path / "Market-1501" / "bounding_box_train"
    os.makedirs(market)
    for name in (
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0007_c3s3_077419_03.jpg",
        "0000_c1s1_000000_01.jpg",
        "-1_c1s1_000401_03.jpg",
        "Thumbs.db",
    ):
        if name.endswith(".jpg"):
            _write_png(str(market / name), 100)
        else:
            (market / name).write_text("x")
    data = load_market1501(str(tmp_path / "Market-1501"), size=(16, 8))
    assert data.class_names == ["0002", "0007"] and data.x.shape == (3, 3, 16, 8)
    assert torch.bincount(data.y).tolist() == [2, 1]
    with pytest.raises(ValueError, match="bounding_box_train"):
        load_market1501(str(root))
    with pytest.raises(ValueError, match="needs a PATH"):
        load_data("imagefolder")
    with pytest.raises(ValueError, match="takes no PATH"):
        load_data("digits", "somewhere")


def test_demo_out_inside_the_data_folder_is_refused_for_an_imagefolder_only(tmp_path, monkeypatch):
    """An --out inside an image folder would become an identity on the next run (refused);
    a Market-1501 root is read through bounding_box_train/ only, so ROOT/runs/x is fine (it
    was refused too)."""
    from feature_cloud.demo import runner

    def reached(*args, **kwargs):
        raise RuntimeError("loading reached")

    monkeypatch.setattr(runner, "load_data", reached)
    root = tmp_path / "data"
    root.mkdir()
    out = str(root / "runs" / "x")
    with pytest.raises(RuntimeError, match="loading reached"):
        runner.run_demo(runner.DemoConfig(data="market1501", path=str(root), out=out))
    with pytest.raises(ValueError, match="inside the image folder"):
        runner.run_demo(runner.DemoConfig(data="imagefolder", path=str(root), out=out))
