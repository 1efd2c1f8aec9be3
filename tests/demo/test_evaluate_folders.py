"""feature-cloud evaluate on a user's own image folders (a user trial): folders load like the
same images in an .npz (area resize), problems are named together and before anything trains,
identities are named in warnings and in results.json, file names give camera ids, Ctrl-C and
logs to a file are handled."""

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from feature_cloud.cli import main
from feature_cloud.evaluate.data import load_dataset

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


def test_folder_images_are_area_resized_like_the_same_images_in_an_npz(tmp_path):
    """--image-size resizes folders as it resizes .npz data ("area"), image by image at each
    one's own size (the folder path used Pillow's bilinear resize: other inputs for the same
    images); the demo keeps its bilinear resize."""
    from feature_cloud.demo.data import load_imagefolder

    images, y = _images()
    root = tmp_path / "faces"
    _folder(root)
    np.savez(tmp_path / "faces.npz", images=images, labels=y)
    big = np.random.RandomState(1).randint(0, 255, (30, 20, 3)).astype(np.uint8)
    Image.fromarray(big).save(root / "id5" / "zz_big.png")  # another size, last in id5
    folder = load_dataset(str(root), (8, 8))
    npz = load_dataset(str(tmp_path / "faces.npz"), (8, 8))
    assert torch.equal(folder.x[:-1], npz.x) and torch.equal(folder.y[:-1], npz.y)
    own = torch.from_numpy(big).permute(2, 0, 1).float()[None] / 255.0
    assert torch.allclose(folder.x[-1], F.interpolate(own, size=(8, 8), mode="area")[0])
    demo = load_imagefolder(str(root), (8, 8))  # the demo: Pillow's bilinear, as before
    pil = Image.fromarray(images[0]).resize((8, 8), Image.BILINEAR)
    assert torch.allclose(demo.x[0], torch.from_numpy(np.array(pil)).permute(2, 0, 1) / 255.0)


def test_every_unreadable_image_is_named_in_one_error_before_training(tmp_path, capsys):
    root = tmp_path / "faces"
    _folder(root)
    (root / "id1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(_images()[0][0]).save(buf, format="JPEG")
    (root / "id3" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out = tmp_path / "out"
    assert main(["evaluate", str(root), *TINY, "--methods", "cosface", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("feature-cloud: error: cannot read 2 image files:") and err.count("\n") == 1
    )
    assert "broken.jpg" in err and "truncated.jpg" in err and "remove or replace them" in err
    assert not out.exists()
    for i in range(12):  # many: the first ten named, the rest counted
        (root / "id0" / f"bad{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot read 14 image files: .*; and 4 more; remove"):
        load_dataset(str(root), (8, 8))


def test_a_symlinked_identity_folder_is_one_identity_named_in_a_warning(tmp_path):
    root = tmp_path / "faces"
    _folder(root)
    os.symlink(root / "id2", root / "Alias_of_id2")  # sorts before id2: the folder is kept
    with pytest.warns(UserWarning, match=r"same folder .*left out Alias_of_id2 \(kept id2\)"):
        data = load_dataset(str(root), (8, 8))
    assert data.class_names == [f"id{i}" for i in range(len(SIZES))]
    assert data.x.shape[0] == sum(SIZES)


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
