"""Data sources of the demo: every one returns a :class:`LabeledData` held in memory.

* ``digits``: ``sklearn.datasets.load_digits`` (1,797 real 8x8 handwritten digits, shipped with
  scikit-learn, no download).
* ``synthetic``: identity-structured feature vectors from a fixed random generator whose
  identities share nuisance factors (the "pose/expression" that head classes show and tail
  classes lack), with controllable class sizes and intra-class spread.
* ``market1501``: the ``bounding_box_train`` folder of the standard Market-1501 layout.
* ``imagefolder``: one sub-folder of images per identity.

Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .._validation import warn_user
from .report import RESULTS_FILE, counted

__all__ = [
    "LabeledData",
    "check_data",
    "SyntheticConfig",
    "load_digits",
    "make_synthetic",
    "load_market1501",
    "load_imagefolder",
    "load_data",
    "DATA_SOURCES",
]

DATA_SOURCES = ("digits", "synthetic", "market1501", "imagefolder")
#: Files that operating systems leave in folders, skipped without a word.
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


#: label dtypes :class:`LabeledData` converts to int64 (torch indexes with int64 / int32 only,
#: and reads a uint8 index as a boolean mask)
_SMALL_INT_LABELS = (torch.uint8, torch.int8, torch.int16)


@dataclass
class LabeledData:
    """Inputs ``x`` (``(N, F)`` vectors or ``(N, C, H, W)`` images, float32) and labels ``y``
    ``(N,)`` in ``0 .. num_classes-1``; ``class_names[i]`` names identity ``i``."""

    x: Tensor
    y: Tensor
    class_names: List[str]
    name: str
    info: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what in ("x", "y"):
            value = getattr(self, what)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"LabeledData: {what} must be a torch.Tensor, got {type(value).__module__}."
                    f"{type(value).__name__} (torch.from_numpy({what}) / torch.as_tensor({what}))"
                )
        if self.y.dtype in _SMALL_INT_LABELS:  # class indices: torch reads uint8 as a mask
            self.y = self.y.long()
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.x.dim() not in (2, 4):
            raise ValueError(f"inputs must be (N, F) or (N, C, H, W), got {tuple(self.x.shape)}")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.class_names)):
            raise ValueError("labels must lie in 0 .. len(class_names) - 1")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4


def check_data(data: Any) -> None:
    """A :class:`LabeledData` an evaluation (or the demo) can train on, for one built by hand:
    finite ``float32`` inputs, images ``(N, C, H, W)`` (channels-last ``(N, H, W, C)`` is
    refused), int64 / int32 labels, and ``camids`` (if any) one integer per image;
    ``TypeError`` / ``ValueError`` naming what is wrong."""
    if not isinstance(data, LabeledData):
        shown = f" {data!r}" if isinstance(data, (str, os.PathLike)) else ""
        raise TypeError(
            "data must be a LabeledData (load_dataset(path) returns one), got "
            f"{type(data).__name__}{shown}"
        )
    if not isinstance(data.x, Tensor) or data.x.dtype != torch.float32:
        raise TypeError(
            f"data.x must be a float32 tensor (x.float()), got {getattr(data.x, 'dtype', type(data.x))}"
        )
    shape = tuple(data.x.shape)
    # channels-last: a last axis of 1, 3 or 4 channels after a second axis that is not one and
    # is larger (H): (N, 64, 64, 3). Channels-first of another channel count with a narrow W
    # ((N, 2, 8, 3), (N, 4, 4, 4)) trains as given (s56 review: refused with no way around)
    if (
        len(shape) == 4
        and shape[1] not in (1, 2, 3, 4)
        and shape[3] in (1, 3, 4)
        and shape[1] > shape[3]
    ):
        raise ValueError(
            f"data.x must be images (N, C, H, W) with C channels first; got {shape}, which "
            "looks like channels-last (N, H, W, C): pass x.permute(0, 3, 1, 2)"
            + (" (RGBA: x[..., :3] first)" if shape[3] == 4 else "")
        )
    if not isinstance(data.y, Tensor) or data.y.dtype not in (torch.int64, torch.int32):
        got = getattr(data.y, "dtype", type(data.y))
        raise TypeError(
            f"data.y must be a 1-D int64 (or int32) tensor of class indices (y.long()), got {got}"
            + (" (torch reads a uint8 index as a boolean mask)" if got == torch.uint8 else "")
        )
    if data.y.dim() != 1:
        raise TypeError(
            f"data.y must be a 1-D tensor of class indices, got shape {tuple(data.y.shape)}"
        )
    if not bool(torch.isfinite(data.x).all()):
        raise ValueError("data.x holds non-finite values (NaN or inf)")
    camids = getattr(data, "camids", None)
    if camids is not None:
        if (
            not isinstance(camids, Tensor)
            or camids.dtype.is_floating_point
            or camids.dtype == torch.bool
            or tuple(camids.shape) != tuple(data.y.shape)
        ):
            raise ValueError(
                f"data.camids must be a 1-D integer tensor of {data.y.numel()} camera ids (one "
                f"per image) or None, got {getattr(camids, 'dtype', type(camids))} "
                f"{tuple(getattr(camids, 'shape', ()))}"
            )


def load_digits() -> LabeledData:
    """scikit-learn's handwritten digits as ``(1797, 1, 8, 8)`` images scaled to ``[0, 1]``."""
    from .._extras import need

    bunch = need("sklearn.datasets", "the digits source", "scikit-learn").load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return LabeledData(x, y, [str(c) for c in bunch.target_names], "digits")


@dataclass
class SyntheticConfig:
    r"""Generator of identity-structured features.

    Identity ``i`` has a latent code :math:`z_i \sim N(0, I_{d_{id}})`; each of its samples draws
    nuisance factors :math:`u \sim N(0, \text{spread}^2 I_{d_{nu}})` *shared by all identities*
    and is observed as :math:`x = \tanh(A z_i + B u) + \text{noise}\,\epsilon`, with fixed random
    ``A`` and ``B``. The class sizes fall geometrically from ``max_per_class`` to
    ``min_per_class`` (a long tail before the protocol cuts it further). A network can learn the
    nuisance directions only where it sees them: in the classes with many samples.
    """

    num_classes: int = 100
    max_per_class: int = 80
    min_per_class: int = 20
    dim: int = 64
    identity_dim: int = 16
    nuisance_dim: int = 8
    spread: float = 1.5
    noise: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"synthetic num_classes must be >= 2, got {self.num_classes}")
        if not 1 <= self.min_per_class <= self.max_per_class:
            raise ValueError(
                "synthetic class sizes need 1 <= min_per_class <= max_per_class, got "
                f"{self.min_per_class}, {self.max_per_class}"
            )
        for name in ("dim", "identity_dim", "nuisance_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        if self.spread < 0 or self.noise < 0:
            raise ValueError("synthetic spread and noise must be >= 0")


def synthetic_class_sizes(cfg: SyntheticConfig) -> np.ndarray:
    """Geometrically decaying class sizes from ``max_per_class`` down to ``min_per_class``."""
    if cfg.num_classes == 1:
        return np.array([cfg.max_per_class])
    ratio = cfg.min_per_class / cfg.max_per_class
    sizes = cfg.max_per_class * ratio ** (np.arange(cfg.num_classes) / (cfg.num_classes - 1))
    return np.maximum(np.round(sizes).astype(int), cfg.min_per_class)


def make_synthetic(cfg: Optional[SyntheticConfig] = None) -> LabeledData:
    """Generate the synthetic long-tailed identity data described in :class:`SyntheticConfig`."""
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    sizes = synthetic_class_sizes(cfg)
    a = rng.standard_normal((cfg.identity_dim, cfg.dim)) / np.sqrt(cfg.identity_dim)
    b = rng.standard_normal((cfg.nuisance_dim, cfg.dim)) / np.sqrt(cfg.nuisance_dim)
    z = rng.standard_normal((cfg.num_classes, cfg.identity_dim))
    labels = np.repeat(np.arange(cfg.num_classes), sizes)
    u = rng.standard_normal((labels.size, cfg.nuisance_dim)) * cfg.spread
    x = np.tanh(z[labels] @ a + u @ b) + cfg.noise * rng.standard_normal((labels.size, cfg.dim))
    return LabeledData(
        torch.as_tensor(x, dtype=torch.float32),
        torch.as_tensor(labels, dtype=torch.long),
        [f"id{i:03d}" for i in range(cfg.num_classes)],
        "synthetic",
        info={"synthetic": cfg.__dict__.copy()},
    )


#: how many unreadable files an error names (the rest: counted)
_NAMED_ERRORS = 10


def _load_images(paths: Sequence[str], size: Tuple[int, int], resize: str = "bilinear") -> Tensor:
    """Read images as RGB, resize to ``size`` = (height, width), return ``(N, 3, H, W)`` in [0, 1].

    ``resize``: ``"bilinear"`` (Pillow, the demo's) or ``"area"`` (each image read at its own
    size, then ``F.interpolate(mode="area")``: what ``.npz`` data get). Every file is read before
    anything fails: unreadable ones are named together in one ``ValueError``."""
    from .._extras import need
    from ._progress import progress

    if resize not in ("bilinear", "area"):
        raise ValueError(f"resize must be 'bilinear' or 'area', got {resize!r}")
    Image = need("PIL.Image", "reading image files", "Pillow")

    from PIL import ImageOps

    h, w = size
    out = torch.empty(len(paths), 3, h, w)
    failed: List[Tuple[str, str]] = []
    dim: List[Tuple[str, float]] = []  # 16-bit images using < 1/16 of their range
    for i, path in enumerate(progress(paths, desc="loading images", unit="img")):
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)  # phone photos: the orientation they show
                rgb, is_dim = _as_rgb(img, path)
                if isinstance(rgb, np.ndarray):  # 16-bit / float: in [0, 1] already, grey
                    if is_dim:
                        dim.append((path, float(np.asarray(img).max())))
                    if resize == "bilinear":
                        rgb = np.asarray(Image.fromarray(rgb, "F").resize((w, h), Image.BILINEAR))
                    arr, scale = np.repeat(rgb[..., None], 3, axis=2), 1.0
                else:
                    if resize == "bilinear":
                        rgb = rgb.resize((w, h), Image.BILINEAR)
                    arr, scale = np.asarray(rgb, dtype=np.float32), 255.0
        except (OSError, Image.DecompressionBombError) as exc:  # not an image, truncated, huge
            failed.append((path, str(exc)))
            continue
        except ValueError as exc:  # _as_rgb: intensities out of any range it knows
            failed.append((path, str(exc).replace(f"image {path!r} ", "")))
            continue
        img_t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1) / scale
        if resize == "area" and tuple(img_t.shape[1:]) != (h, w):
            img_t = torch.nn.functional.interpolate(img_t[None], size=(h, w), mode="area")[0]
        out[i] = img_t
    if failed:
        raise ValueError(_unreadable_message(failed))
    if dim:
        names = ", ".join(repr(p) for p, _ in dim[:3]) + (", ..." if len(dim) > 3 else "")
        warn_user(
            dim_16bit_message(
                f"{counted(len(dim), '16-bit image')} ({names})", max(t for _, t in dim)
            )
        )
    return out


def _unreadable_message(failed: List[Tuple[str, str]]) -> str:
    """One error naming every unreadable file (the first :data:`_NAMED_ERRORS`, then a count)."""
    if len(failed) == 1:
        path, why = failed[0]
        return f"cannot read image {path!r} ({why}); remove or replace it"
    named = "; ".join(f"{p!r} ({why})" for p, why in failed[:_NAMED_ERRORS])
    more = len(failed) - _NAMED_ERRORS
    return (
        f"cannot read {len(failed)} image files: {named}"
        + (f"; and {more} more" if more > 0 else "")
        + "; remove or replace them"
    )


#: 16-bit data (integers above 255) using less than this share of 0..65535 warn: they come out
#: dark, scaled from 65535 as every 16-bit image is (12-bit data, for instance)
DIM_16BIT = 1 / 16


def unit_range(arr: np.ndarray, depth: str) -> np.ndarray:
    """``arr`` as ``float32``, one rule for folder and ``.npz`` images. ``depth="int"``:
    0..255 divided by 255 (8-bit values in a 16-bit container too), up to 65535 (16-bit data)
    by 65535, no rounding. ``depth="float"``: as they are ([0, 1], a resize's overshoot,
    standardised values), except non-negative floats with a maximum above 2 (0..255 data),
    divided by 255. ``ValueError`` for negative integers, integers above 65535 and non-finite
    floats."""
    if depth == "float":
        if not np.isfinite(arr).all():
            raise ValueError("non-finite values (NaN or inf)")
        top = float(arr.max()) if arr.size else 0.0
        low = float(arr.min()) if arr.size else 0.0
        scale = 255.0 if low >= 0 and 2.0 < top <= 255.0 else 1.0
        return arr.astype(np.float32) / np.float32(scale)  # type: ignore[no-any-return]
    top = float(arr.max()) if arr.size else 0.0
    low = float(arr.min()) if arr.size else 0.0
    if low < 0 or top > 65535:
        raise ValueError(
            f"values in [{low:g}, {top:g}]: expected intensities 0..255 (8-bit) or 0..65535"
        )
    scale = 255.0 if top <= 255 else 65535.0
    return arr.astype(np.float32) / np.float32(scale)  # type: ignore[no-any-return]


def dim_16bit(arr: np.ndarray) -> bool:
    """Whether integer data ``arr`` are 16-bit (above 255) and use less than
    :data:`DIM_16BIT` of 0..65535."""
    top = float(arr.max()) if arr.size else 0.0
    return 255 < top < DIM_16BIT * 65535


def dim_16bit_message(what: str, top: float) -> str:
    """The warning of :func:`dim_16bit` data, ``what`` naming them."""
    return (
        f"{what} use at most {top:g} of the 16-bit range 0..65535 (less than 1/16): integers "
        "above 255 are scaled from 65535, so they come out dark (12-bit data, for instance); "
        "rescale them to 0..255 or 0..65535"
    )


def _as_rgb(img: Any, path: str) -> Any:
    """An RGB Pillow image of ``img``, or for 16-bit / 32-bit integer and float images a
    ``float32`` ``(H, W)`` array (:func:`unit_range`: integers from 0..255, or from 0..65535
    where they hold more; Pillow's own conversion clips them at 255)."""
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img)
        depth = "float" if img.mode == "F" else "int"
        try:
            return unit_range(arr, depth), depth == "int" and dim_16bit(arr)
        except ValueError as err:
            raise ValueError(
                f"image {path!r} (mode {img.mode}) holds {err}; convert it to 8-bit"
            ) from None
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns converting such palettes straight to RGB
    return img.convert("RGB"), False


def _from_paths(
    paths: List[str],
    ids: List[str],
    size: Tuple[int, int],
    name: str,
    root: str,
    resize: str = "bilinear",
) -> LabeledData:
    if not paths:
        raise ValueError(f"no images found under {root!r}")
    names = sorted(set(ids))
    index = {n: i for i, n in enumerate(names)}
    y = torch.tensor([index[i] for i in ids], dtype=torch.long)
    return LabeledData(_load_images(paths, size, resize), y, names, name, info={"root": root})


_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def load_market1501(root: str, size: Tuple[int, int] = (64, 32)) -> LabeledData:
    """Market-1501's ``bounding_box_train`` (``PID_cCsS_FRAME_NN.jpg``) as one identity per PID.

    ``root`` is the dataset folder (holding ``bounding_box_train``) or that folder itself.
    Junk (PID ``-1``) and distractor (PID ``0000``) images are skipped. The official
    query/gallery identities are disjoint from the training ones, so this closed-set protocol
    holds out images of the training identities instead (see :mod:`.protocol`).
    """
    folder = os.path.join(root, "bounding_box_train")
    if not os.path.isdir(folder):
        if os.path.basename(os.path.normpath(root)) == "bounding_box_train" and os.path.isdir(root):
            folder = root
        else:
            raise ValueError(f"{root!r} is not a Market-1501 folder (no bounding_box_train/)")
    paths, ids = [], []
    for fname in sorted(os.listdir(folder)):
        match = _MARKET_NAME.match(fname)
        if not match or not fname.lower().endswith(IMAGE_EXTENSIONS):
            continue
        pid = int(match.group(1))
        if pid <= 0:
            continue
        paths.append(os.path.join(folder, fname))
        ids.append(f"{pid:04d}")
    return _from_paths(paths, ids, size, "market1501", root)


def scan_imagefolder(root: str) -> Tuple[List[str], List[str]]:
    """The image files of ``root/<identity>/<image>`` and their identities (folder names), in
    sorted order. Hidden files (names starting with ``.``, e.g. macOS ``._*`` files) are
    skipped; other entries left out (hidden folders, nested folders, other formats, loose
    images, empty identity folders) are named in one warning; identity folders that are the
    same directory (a symlink to another identity's folder) are read once, named in a warning;
    sub-folders holding a ``results.json`` (a run's ``--out``) are left out, named in a warning."""
    if not os.path.isdir(root):
        raise ValueError(f"imagefolder path {root!r} is not a directory")
    paths, ids = [], []
    skipped: Dict[Tuple[str, str], List[str]] = {
        ("identity folder without images", "identity folders without images"): [],
        ("other entry", "other entries"): [],
        ("hidden folder", "hidden folders"): [],
        ("loose file at the top", "loose files at the top"): [],
    }
    folders: Dict[str, List[str]] = {}  # real directory -> identity folders naming it
    for ident in sorted(os.listdir(root)):
        sub = os.path.join(root, ident)
        if ident.startswith("."):  # hidden files skipped; a hidden folder named (an identity?)
            if os.path.isdir(sub):
                skipped[("hidden folder", "hidden folders")].append(ident)
            continue
        if not os.path.isdir(sub):
            if ident.lower() not in _SYSTEM_FILES:  # a loose file, outside any identity
                skipped[("loose file at the top", "loose files at the top")].append(ident)
            continue
        folders.setdefault(os.path.realpath(sub), []).append(ident)
    keep = set()
    same: List[str] = []
    for names in folders.values():
        # the folder itself rather than a link to it; else the first name
        real = [n for n in names if not os.path.islink(os.path.join(root, n))]
        kept = (real or names)[0]
        keep.add(kept)
        if len(names) > 1:
            others = [n for n in names if n != kept]
            same.append(f"{', '.join(others)} (kept {kept})")
    if same:
        warn_user(
            f"{root!r}: identity folders that are the same folder (a symlink) are read once, "
            f"as one identity: left out {'; '.join(same)}"
        )
    runs = sorted(n for n in keep if os.path.isfile(os.path.join(root, n, RESULTS_FILE)))
    if runs:
        warn_user(
            f"{root!r}: left out {', '.join(runs)}: {'it holds' if len(runs) == 1 else 'they hold'} "
            f"a {RESULTS_FILE}, the output of a feature-cloud run, not an identity's images; "
            "write runs (--out) outside the image folder"
        )
    for ident in sorted(keep - set(runs)):
        sub = os.path.join(root, ident)
        found = 0
        for fname in sorted(os.listdir(sub)):
            if fname.startswith(".") or fname.lower() in _SYSTEM_FILES:
                continue
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(sub, fname))
                ids.append(ident)
                found += 1
            else:  # another extension, or a nested folder (sessions, cameras, ...)
                skipped[("other entry", "other entries")].append(os.path.join(ident, fname))
        if not found:
            skipped[("identity folder without images", "identity folders without images")].append(
                ident
            )
    said = [(what, sorted(names)) for what, names in skipped.items() if names]
    summary = "; ".join(
        f"{counted(len(names), *what)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        for what, names in said
    )
    rule = (
        f"Only {', '.join(IMAGE_EXTENSIONS)} files directly inside an identity's folder are "
        "read: flatten nested folders, convert other formats"
    )
    if not paths:
        raise ValueError(
            f"no images found under {root!r}: expected {os.path.join(root, '<identity>', '<image>')}"
            + (f"; left out {summary}" if summary else "")
            + _layout_hint(root, skipped)
        )
    if said:  # loose files alone (a README.txt): named, without the layout advice
        loose_only = all(what[0] == "loose file at the top" for what, _ in said)
        warn_user(f"{root!r}: left out {summary}." + ("" if loose_only else f" {rule}"))
    paths, ids = _once_per_file(root, paths, ids)
    _warn_same_normalized(root, sorted(set(ids)))
    return paths, ids


def _once_per_file(root: str, paths: List[str], ids: List[str]) -> Tuple[List[str], List[str]]:
    """Image files that are one file (a symlink to another image) read once, the file itself
    kept rather than a link to it, the others named in a warning: counted twice, the same photo
    could land in the training and the test images (eval trial s58)."""
    where: Dict[str, List[int]] = {}
    for i, path in enumerate(paths):
        where.setdefault(os.path.realpath(path), []).append(i)
    dropped: List[int] = []
    for group in where.values():
        if len(group) > 1:
            real = [i for i in group if not os.path.islink(paths[i])]
            kept = (real or group)[0]
            dropped += [i for i in group if i != kept]
    if not dropped:
        return paths, ids
    gone = set(dropped)
    named = [os.path.relpath(paths[i], root) for i in sorted(gone)]
    warn_user(
        f"{root!r}: {counted(len(named), 'image file is', 'image files are')} the same file as "
        f"another one read (a symlink), read once: left out {', '.join(named[:5])}"
        + (", ..." if len(named) > 5 else "")
    )
    keep = [i for i in range(len(paths)) if i not in gone]
    return [paths[i] for i in keep], [ids[i] for i in keep]


def _warn_same_normalized(root: str, names: List[str]) -> None:
    """Warn naming the identity folders whose names are one name in Unicode normalization form
    NFC (``Zo\\xeb`` and ``Zoe\\u0308``: a folder copied from macOS writes NFD): they look the
    same wherever printed, yet are read as different identities (not merged: they may be two
    people; renaming one merges them)."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        groups.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    same = [group for group in groups.values() if len(group) > 1]
    if same:
        shown = "; ".join(" and ".join(ascii(n) for n in group) for group in same[:5])
        more = f" and {len(same) - 5} more" if len(same) > 5 else ""
        warn_user(
            f"{root!r}: identity folders whose names differ only in their Unicode normalization "
            f"(NFC vs NFD, e.g. a copy made on macOS) look the same but are read as different "
            f"identities: {shown}{more}; if each pair is one person, rename one folder of it to "
            "the other's name (its images then join that identity)"
        )


def _layout_hint(root: str, skipped: Dict[Tuple[str, str], List[str]]) -> str:
    """Why a folder gave no image: images loose at the top (no identity folders), or identity
    folders one level too deep (``root/train/<identity>/<image>``)."""
    loose = [
        n
        for n in skipped[("loose file at the top", "loose files at the top")]
        if n.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if loose:
        return (
            f". The images at the top belong in one folder per identity "
            f"({os.path.join(root, '<identity>', loose[0])})"
        )
    deeper = sorted(
        {
            os.path.join(root, entry.split(os.sep)[0])
            for entry in skipped[("other entry", "other entries")]
            if os.path.isdir(os.path.join(root, entry))
        }
    )
    if deeper:
        return (
            f". The identity folders seem one level down: give {', '.join(map(repr, deeper[:3]))}"
            + (" (each a dataset of its own)" if len(deeper) > 1 else "")
        )
    return ""


def load_imagefolder(
    root: str, size: Tuple[int, int] = (32, 32), resize: str = "bilinear"
) -> LabeledData:
    """One sub-folder per identity (``root/<identity>/<image>``, :func:`scan_imagefolder`),
    images resized to ``size`` (``resize``: ``"bilinear"``, Pillow's, the demo's; or
    ``"area"``, as ``feature-cloud evaluate`` resizes ``.npz`` images)."""
    paths, ids = scan_imagefolder(root)
    return _from_paths(paths, ids, size, "imagefolder", root, resize)


def load_data(
    source: str,
    path: Optional[str] = None,
    *,
    image_size: Optional[Tuple[int, int]] = None,
    synthetic: Optional[SyntheticConfig] = None,
) -> LabeledData:
    """Dispatch on ``source`` (one of :data:`DATA_SOURCES`)."""
    if source not in DATA_SOURCES:
        raise ValueError(f"data source must be one of {DATA_SOURCES}, got {source!r}")
    needs_path = source in ("market1501", "imagefolder")
    if needs_path and not path:
        raise ValueError(f"--data {source} needs a PATH")
    if not needs_path and path:
        raise ValueError(f"--data {source} takes no PATH (got {path!r})")
    if source == "digits":
        return load_digits()
    if source == "synthetic":
        return make_synthetic(synthetic)
    if source == "market1501":
        return load_market1501(path, image_size or (64, 32))  # type: ignore[arg-type]
    return load_imagefolder(path, image_size or (32, 32))  # type: ignore[arg-type]
