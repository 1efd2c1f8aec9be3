"""feature-cloud evaluate on bad input, as a user meets it: every problem named in one line,
before an output folder is made or a model trains; a finished evaluation is never overwritten;
a diverged training is reported, never scored."""

import json
import os

import numpy as np
import pytest
import torch

from feature_cloud.cli import _parse_value, main
from feature_cloud.evaluate.data import load_npz


def _arrays(sizes=(16, 12, 4, 4, 3, 3), seed=0):
    rng = np.random.RandomState(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    proto = rng.randint(0, 255, size=(len(sizes), 12, 12, 3))
    noise = rng.randint(-30, 30, size=(y.size, 12, 12, 3))
    return np.clip(proto[y] + noise, 0, 255).astype(np.uint8), y


def _npz(path, **arrays):
    images, labels = _arrays()
    data = {"images": images, "labels": labels}
    data.update(arrays)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return str(path)


def _bad_arrays():
    images, labels = _arrays()
    nan = images.astype(np.float32) / 255
    nan[3, 0, 0, 0] = np.nan
    return {
        "channels first": (dict(images=images.transpose(0, 3, 1, 2)), "images.transpose"),
        "4 channels": (
            dict(images=np.concatenate([images, images[..., :1]], 3)),
            r"C = 1 or 3.*images\[\.\.\., :3\]",
        ),
        "2-D labels": (dict(labels=labels[:, None]), r"labels must be 1-D.*labels\.ravel\(\)"),
        "NaN pixel": (dict(images=nan), "non-finite"),
        "ints above 65535": (dict(images=images.astype(np.int64) * 300), r"0\.\.65535"),
        "negative ints": (dict(images=images.astype(np.int64) - 1), r"0\.\.255"),
        "bool images": (dict(images=images > 127), "integers .* or floats"),
        "camids too short": (dict(camids=np.zeros(labels.size - 1, np.int64)), "camids"),
        "float camids": (dict(camids=np.zeros(labels.size)), "camids must be integers"),
        "one identity": (dict(labels=np.zeros_like(labels)), "1 identity: need at least 2"),
        "no images": (dict(images=images[:0], labels=labels[:0]), "no images"),
        "float labels": (
            dict(labels=labels.astype(float)),
            r"integers or strings.*labels\.astype\(int\)",
        ),
        "object labels": (
            dict(labels=np.array([f"id{v}" for v in labels], dtype=object)),
            "'labels' is an array of Python objects .* dtype=str",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_arrays()))
def test_load_npz_names_what_is_wrong_with_the_arrays(tmp_path, case):
    arrays, match = _bad_arrays()[case]
    path = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert repr(path) in str(info.value)  # every message names the file


def test_load_npz_takes_identity_names_as_labels(tmp_path):
    """String labels (names, as researchers keep them) are identities in sorted name order: the
    same data as integer ids in that order, with the names as class names."""
    images, labels = _arrays()
    names = np.array([f"person_{chr(ord('a') + int(v))}" for v in labels])
    by_name = load_npz(_npz(tmp_path / "names.npz", labels=names))
    by_id = load_npz(_npz(tmp_path / "ids.npz", labels=labels))
    assert torch.equal(by_name.y, by_id.y) and torch.equal(by_name.x, by_id.x)
    assert by_name.class_names == sorted(set(names.tolist()))
    as_bytes = load_npz(_npz(tmp_path / "bytes.npz", labels=names.astype("S")))
    assert as_bytes.class_names == by_name.class_names and torch.equal(as_bytes.y, by_id.y)


def test_load_npz_scales_any_integer_images_and_refuses_other_files(tmp_path):
    images, _ = _arrays()
    a = load_npz(_npz(tmp_path / "u8.npz"))
    b = load_npz(_npz(tmp_path / "i64.npz", images=images.astype(np.int64)))
    assert float(a.x.max()) <= 1.0 and bool((a.x == b.x).all())
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_npz(str(text))


def test_leap_option_values_parse_as_a_user_types_them():
    assert _parse_value("none") is None and _parse_value("None") is None
    assert _parse_value("false") is False and _parse_value("True") is True
    assert _parse_value("0.5") == 0.5 and _parse_value("paper") == "paper"


TINY = ["--image-size", "8", "8", "--epochs", "2", "--seeds", "0", "-T", "5", "--quiet"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--leap-option", "bogus=1"], "unexpected keyword argument 'bogus'"),
        (["--leap-option", "prototype_shrinkage=abc"], "prototype_shrinkage"),
        (["--leap-option", "cloud_mode=xyz"], "cloud_mode"),
        (["--lr", "nan"], "lr must be a finite number > 0"),
        (["--weight-decay", "-1"], "weight_decay"),
        (["-T", "-1"], r"threshold \(-T\) must be >= 0"),
        (["--protocol", "hs", "-S", "0"], r"shots \(-S\) must be >= 1, got 0"),
        (
            ["--seeds", "0", "3", "0"],
            r"distinct seeds \(--seeds\), got \[0, 3, 0\]: \[0\] repeated",
        ),
        (["--methods", "ftl", "--ftl-alternations", "0"], "ftl_alternations must be >= 1"),
        (["--seeds", "-1"], r"seeds must be in \[0, 2\*\*32\)"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--n-test", "16"], "trains 0 identities: need at least 2"),
        (
            ["--protocol", "hs", "-H", "500"],
            r"-H 500: .* has (\d+) identities; choose -H in \(0, \1\) \(below \1, so",
        ),
        (["--image-size", "0", "0"], r"image_size \(--image-size\) must be two sizes >= 1"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_cli_evaluate_refuses_before_anything_is_written(tmp_path, capsys, args, match):
    """A bad option or a split with nothing to train on is one error line (exit 2), raised
    before the output folder exists: the LEAP head's own options before the baseline trains."""
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    assert main(["evaluate", data, *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("feature-cloud: error:") and err.count("\n") == 1, err
    assert __import__("re").search(match, err), err
    assert not out.exists()


def test_cli_evaluate_refuses_an_output_path_through_a_file(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["evaluate", data, *TINY, "--out", str(blocker / "out")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path), str(tmp_path), "--out", str(blocker)]) == 2


def test_cli_evaluate_never_overwrites_a_users_files_and_takes_an_upper_case_npz(tmp_path, capsys):
    """An --out holding files of the names an evaluation writes (a user's own summary.md) but no
    results.json is refused before anything trains; ``.NPZ`` is an npz file."""
    data = _npz(tmp_path / "d.npz")
    upper = tmp_path / "FACES.NPZ"
    os.replace(data, upper)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    assert main(["evaluate", str(upper), *TINY, "--out", str(out)]) == 2
    assert "holds summary.md but no evaluation" in capsys.readouterr().err
    assert (out / "summary.md").read_text() == "my notes" and sorted(os.listdir(out)) == [
        "summary.md"
    ]
    assert main(["evaluate", str(upper), *TINY, "--out", str(tmp_path / "fresh")]) == 0
    # report's merge and comparison refuse the user's files alike (they were overwritten)
    fresh = str(tmp_path / "fresh")
    assert main(["evaluate", str(upper), *TINY, "--seeds", "0", "1", "--out", fresh + "1"]) == 0
    capsys.readouterr()
    assert main(["report", fresh, fresh + "1", "--out", str(out)]) == 2
    assert "holds summary.md but no evaluation" in capsys.readouterr().err
    (out / "compare.md").write_text("my comparison")
    assert main(["report", fresh, fresh + "1", "--compare", "--out", str(out)]) == 2
    assert "holds compare.md that no comparison wrote" in capsys.readouterr().err
    assert (out / "summary.md").read_text() == "my notes"
    assert (out / "compare.md").read_text() == "my comparison"
    cmp = str(tmp_path / "cmp")
    for _ in range(2):  # an earlier comparison is rewritten
        assert main(["report", fresh, fresh + "1", "--compare", "--out", cmp]) == 0


def test_cli_evaluate_never_overwrites_an_evaluation_and_writes_paired_md(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    args = ["evaluate", data, *TINY, "--methods", "leap_full_cosface", "--out", str(out)]
    assert main(args) == 0
    assert (out / "paired.md").read_text().count("LEAP full (CosFace)") == 1
    before = (out / "results.json").read_text()
    assert main(args[:-4] + ["--seeds", "1", "--out", str(out)]) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert main(args + ["--resume"]) == 0  # continuing it is allowed (nothing left to train)
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_cli_evaluate_keeps_one_and_several_setting_runs_apart(tmp_path, capsys):
    """An evaluation of several settings (a folder each) into an --out that holds one
    setting's evaluation, or one setting into the --out of several, is refused before anything
    trains: `report` of that folder would show one of them and skip the other silently."""
    data = _npz(tmp_path / "d.npz")
    base = ["evaluate", data, *TINY, "--methods", "cosface"]
    several = ["--protocol", "hs", "-H", "2", "-S", "1", "2"]
    one = tmp_path / "one"
    assert main(base + ["--out", str(one)]) == 0
    before = sorted(os.listdir(one))
    capsys.readouterr()
    assert main(base + several + ["--out", str(one)]) == 2
    assert "holds an evaluation of one setting" in capsys.readouterr().err
    assert sorted(os.listdir(one)) == before
    many = tmp_path / "many"
    assert main(base + several + ["--out", str(many)]) == 0
    before = sorted(os.listdir(many))
    capsys.readouterr()
    assert main(base + ["--out", str(many)]) == 2
    err = capsys.readouterr().err
    assert "holds an evaluation of several settings (H2_S1, H2_S2)" in err, err
    assert sorted(os.listdir(many)) == before
    assert main(base + several + ["--out", str(many), "--resume"]) == 0  # continuing: fine
    two = tmp_path / "two"  # report's merge into it is refused alike
    assert main(base + ["--seeds", "1", "--out", str(two)]) == 0
    capsys.readouterr()
    assert main(["report", str(one), str(two), "--out", str(many)]) == 2
    assert "holds an evaluation of several settings" in capsys.readouterr().err
    assert sorted(os.listdir(many)) == before


def test_cli_evaluate_reports_a_diverged_training_instead_of_scoring_it(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    args = ["evaluate", data, *TINY, "--methods", "cosface", "--lr", "1e9", "--batch-size", "8"]
    args += ["--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "cosface" in err and "--lr" in err, err
    assert not out.exists()  # nothing scored, nothing to resume: the empty folder removed


def test_cli_evaluate_warns_when_no_tail_identity_reaches_s(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    out = str(tmp_path / "out")
    args = ["evaluate", data, *TINY, "--methods", "cosface", "--protocol", "hs", "-H", "2"]
    assert main(args + ["-S", "50", "--out", out]) == 0
    assert "no tail identity has 50 training images (the most: 2)" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "results.json"))


def test_cli_version(capsys):
    from feature_cloud import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"feature-cloud {__version__}"


def test_cli_evaluate_warns_about_options_this_evaluation_ignores(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    args = ["evaluate", data, *TINY, "--methods", "cosface", "--out", str(tmp_path / "out")]
    extra = ["-H", "3", "--ftl-energy", "0.9", "--leap-option", "gamma=0.2"]
    assert main(args + extra + ["--test-fraction", "0.3"]) == 0
    err = capsys.readouterr().err
    assert err.count("feature-cloud: warning: ignored in this evaluation:") == 1, err
    for name in ("-H / -S", "--test-fraction", "--ftl-energy", "--leap-option"):
        assert name in err, err
    args[-1] = str(tmp_path / "out2")
    assert main(args + ["--methods", "leap_full_cosface", "--leap-option", "gamma=0.2"]) == 0
    assert "ignored" not in capsys.readouterr().err
    args[-1] = str(tmp_path / "out3")  # the open protocol holds out identities, not images
    assert main(args + ["--protocol", "open", "--n-test", "3"]) == 0
    assert "--n-test (the closed-set protocols" in capsys.readouterr().err
    args[-1] = str(tmp_path / "out4")  # open: no closed-set logits, so no sweep.md either
    sweep = ["--methods", "leap_full_cosface", "--shrinkage-sweep", "0", "10"]
    assert main(args + ["--protocol", "open"] + sweep) == 0
    err = capsys.readouterr().err
    assert "ignored in this evaluation: --shrinkage-sweep (the closed-set protocols" in err, err
    assert not (tmp_path / "out4" / "sweep.md").exists()


def test_cli_evaluate_with_one_training_image_per_identity_plots_and_reports(tmp_path, capsys):
    """Two images an identity and ``--n-test 1`` (VIPeR's case): every class trains on one
    image, so its angle variance is n/a everywhere. The per-class plots say so instead of
    failing on an empty log axis (the evaluation used to stop after training, ``report`` too)."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.repeat(np.arange(8), 2), [8, 9]])  # 8, 9: one image each
    images = rng.integers(0, 256, (labels.size, 8, 8, 3), dtype=np.uint8)
    data = _npz(tmp_path / "pairs.npz", images=images, labels=labels)
    out = tmp_path / "out"
    args = ["evaluate", data, "--image-size", "8", "8", "--epochs", "1", "--seeds", "0"]
    args += ["--n-test", "1", "-T", "0", "--methods", "cosface", "--quiet", "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "identities have" in ln]
    # identities 8 and 9 have no image to train on: said once, and n/a in the per-class values
    assert len(warned) == 1 and "2 of 10 identities have at most --n-test 1 images" in warned[0]
    for name in ("angle_variance_vs_class_size.png", "weight_norm_vs_class_size.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.json") as fh:
        run = json.load(fh)["runs"][0]
    assert set(run["per_class"]["angle_var_train"]) == {None}  # n/a: one training image each
    norms, accs = run["per_class"]["weight_norm"], run["per_class"]["fc_acc"]
    assert norms[8:] == [None, None] and None not in norms[:8]  # the untrained rows: n/a
    assert accs[8:] == [None, None] and None not in accs[:8]  # no test image: n/a, not 0
    assert main(["report", str(out), "--quiet"]) == 0


@pytest.mark.filterwarnings("ignore:.*left out 1 identity folder")  # asserted once, below
def test_image_folder_reads_what_a_users_camera_and_tools_write(tmp_path, monkeypatch):
    """16-bit and float images keep their contrast (Pillow's RGB conversion clipped 16-bit at
    255: a white image; float [0, 1] became black), EXIF orientation is applied, palette images
    with transparency load without Pillow's warning, a decompression bomb is one clear error,
    and files or folders the loader does not read are named in a warning."""
    Image = pytest.importorskip("PIL.Image")
    import warnings

    from feature_cloud.demo.data import load_imagefolder

    ramp = np.linspace(0.0, 1.0, 16 * 16).reshape(16, 16)
    root = tmp_path / "faces"
    for ident in ("a", "b"):
        (root / ident).mkdir(parents=True)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(root / "a" / "16bit.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(root / "a" / "float.tif")
    landscape = np.zeros((8, 16, 3), np.uint8)
    landscape[:, :4] = 255  # a white strip on the left, shown on top after orientation 6
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    Image.fromarray(landscape).save(root / "b" / "phone.jpg", exif=exif.tobytes())
    palette = Image.new("P", (16, 16))
    palette.info["transparency"] = b"\x00"
    palette.save(root / "b" / "palette.png", transparency=0)
    (root / "b" / "notes.txt").write_text("x")
    (root / "b" / "session2").mkdir()
    (root / "empty").mkdir()
    with pytest.warns(UserWarning, match=r"left out 1 identity folder without images \(empty\)"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Palette images")
            data = load_imagefolder(str(root), (16, 16))
    assert data.class_names == ["a", "b"] and data.x.shape[0] == 4
    for img in data.x[data.y == 0]:  # both ramps: the full range, not clipped or black
        assert float(img.min()) < 0.05 and float(img.max()) > 0.95
        assert 0.4 < float(img.mean()) < 0.6
    phone = data.x[data.y == 1][1]  # sorted: palette.png, phone.jpg
    assert phone.shape == (3, 16, 16)
    assert float(phone[:, :4].mean()) > 0.8 and float(phone[:, -4:].mean()) < 0.2  # top strip
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # as a 14000 x 14000 image would
    with pytest.raises(
        ValueError, match=r"cannot read 4 image files: .*16bit.png.*decompression bomb"
    ):
        load_imagefolder(str(root), (16, 16))


def test_integer_images_holding_only_0_and_1_are_refused(tmp_path, capsys):
    """Floats in [0, 1] cast to uint8 (``(x / 255).astype(np.uint8)``) hold only 0 and 1:
    they would train on black images; the error says how to save them."""
    images, _ = _arrays()
    path = _npz(tmp_path / "d.npz", images=(images / 255).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["evaluate", path, *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hold only 0 and 1" in err and "(x * 255).round().astype(np.uint8)" in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="zero size"):
        load_npz(_npz(tmp_path / "empty.npz", images=images[:, :0]))


def test_load_npz_reads_big_endian_arrays_and_names_damaged_ones(tmp_path):
    """Big-endian arrays (saved on another machine or by another tool) load as the native ones
    (torch refused them); a truncated member is named as damaged (it was called an object
    array); 0-d subject_names are named (a TypeError)."""
    import io
    import zipfile

    images, labels = _arrays()
    cams = (np.arange(labels.size) % 2).astype(">i8")
    native = load_npz(_npz(tmp_path / "n.npz", camids=cams.astype(np.int64)))
    swapped = load_npz(
        _npz(tmp_path / "b.npz", images=images.astype(">u2") * 257, labels=labels.astype(">i4"))
    )
    assert torch.equal(native.x, swapped.x) and torch.equal(native.y, swapped.y)
    be = load_npz(_npz(tmp_path / "c.npz", images=images.astype(">f4") / 255, camids=cams))
    assert torch.equal(be.camids, native.camids) and torch.allclose(be.x, native.x)
    buf = io.BytesIO()
    np.save(buf, images)
    full = io.BytesIO()
    np.save(full, labels)
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(damaged, "w") as zf:
        zf.writestr("images.npy", buf.getvalue()[:500])
        zf.writestr("labels.npy", full.getvalue())
    with pytest.raises(ValueError, match=r"'images' cannot be read \(damaged") as info:
        load_npz(str(damaged))
    assert "Python objects" not in str(info.value)
    with pytest.raises(ValueError, match=r"subject_names must be 1-D .* shape \(\)"):
        load_npz(_npz(tmp_path / "s.npz", subject_names=np.array("ann")))


def test_camera_digits_beyond_64_bits_name_the_file(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for ident in ("a", "b"):
        (tmp_path / ident).mkdir()
        for i in range(3):
            digits = "9" * 25 if (ident, i) == ("b", 1) else "1"
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
                tmp_path / ident / f"x_c{digits}_{i}.png"
            )
    from feature_cloud.evaluate.data import load_dataset

    with pytest.raises(ValueError, match=r"camera id .* too large .*x_c9{25}_1\.png"):
        load_dataset(str(tmp_path), (4, 4))


def test_cli_evaluate_refuses_an_empty_out_and_a_changed_settings_list(tmp_path, capsys):
    """``--out ''`` is named before the data are read; an evaluation of several settings whose
    -S list changed (``--resume`` or not) is refused: combined.md would drop the other
    settings silently."""
    data = _npz(tmp_path / "d.npz")
    assert main(["evaluate", str(tmp_path / "missing.npz"), *TINY, "--out", ""]) == 2
    assert "out (--out) must name a folder, got ''" in capsys.readouterr().err
    root = tmp_path / "root"
    hs = ["evaluate", data, *TINY, "--methods", "cosface", "--protocol", "hs", "-H", "2"]
    assert main([*hs, "-S", "1", "2", "--out", str(root)]) == 0
    for more in (["--resume"], []):
        assert main([*hs, "-S", "1", "3", *more, "--out", str(root)]) == 2
        err = capsys.readouterr().err
        assert "holds the settings H2_S2 besides those of -S 1 3" in err, err
        assert sorted(os.listdir(root)) == [
            "H2_S1",
            "H2_S2",
            "combined.md",
            "combined_paired.csv",
            "combined_summary.csv",
        ]
    assert main([*hs, "-S", "1", "2", "--resume", "--out", str(root)]) == 0


def test_float_images_just_above_one_or_standardised_are_kept_as_they_are(tmp_path):
    """Floats in [0, 1] with a resize's overshoot (max 1.03), or standardised (negative), are
    kept as they are (the 0..255 rule divided an overshooting [0, 1] set by 255: nearly black
    images); non-negative floats with a maximum above 2 are 0..255 data, divided by 255."""
    rng = np.random.default_rng(0)
    images = rng.random((8, 6, 6, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 2)
    for name, top, low, divisor in (
        ("over", 1.03, 0.0, 1),
        ("std", 3.0, -2.0, 1),
        ("u255", 3.0, 0.0, 255),
    ):
        arr = images.copy()
        arr[0, 0, 0, 0], arr[0, 0, 0, 1] = top, low
        np.savez(tmp_path / f"{name}.npz", images=arr, labels=labels)
        x = load_npz(str(tmp_path / f"{name}.npz")).x
        assert torch.allclose(x, torch.from_numpy(arr).permute(0, 3, 1, 2) / divisor), name
