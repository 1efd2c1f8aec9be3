"""feature-cloud evaluate on a user's own image folders (a user trial): folders load like the
same images in an .npz (area resize), problems are named together and before anything trains,
identities are named in warnings and in results.json, file names give camera ids, Ctrl-C and
logs to a file are handled."""

import io

import numpy as np
import pytest

from feature_cloud.cli import main

Image = pytest.importorskip("PIL.Image")

SIZES = (8, 8, 6, 5, 4, 3)
TINY = ["--image-size", "8", "8", "--epochs", "1", "--seeds", "0", "-T", "4", "--quiet"]


def _images(sizes=SIZES, hw=(12, 12), seed=0):
    rng = np.random.RandomState(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    proto = rng.randint(0, 255, size=(len(sizes), *hw, 3))
    noise = rng.randint(-30, 30, size=(y.size, *hw, 3))
    return np.clip(proto[y] + noise, 0, 255).astype(np.uint8), y


def _folder(root, sizes=SIZES, cameras=False, names=None):
    """One sub-folder per identity (``id0``, ``id1``, ...), PNG files; with ``cameras``
    Market-1501-style names ``0001_c1s1_000001_00.png`` (cameras alternating 1, 2)."""
    images, y = _images(sizes)
    names = names or [f"id{i}" for i in range(len(sizes))]
    for i, (img, label) in enumerate(zip(images, y)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        fname = f"{label:04d}_c{i % 2 + 1}s1_{i:06d}_00.png" if cameras else f"{i:03d}.png"
        Image.fromarray(img).save(folder / fname)
    return str(root)


def test_no_progress_bars_where_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """Piped to a file, stderr gets no carriage-return frames (a bar per run); stdout keeps the
    per-run lines. On a terminal the bars are drawn as before."""
    import sys

    from feature_cloud.demo._progress import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    for _ in progress(range(3), desc="x", mininterval=0):
        pass
    assert "\r" in term.getvalue()
    monkeypatch.undo()
    images, y = _images()
    data = str(tmp_path / "d.npz")
    np.savez(data, images=images, labels=y)
    args = ["evaluate", data, *TINY[:-1], "--methods", "cosface", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "step/s" not in captured.err, captured.err
    assert "  seed 0 CosFace" in captured.out
