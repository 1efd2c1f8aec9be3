"""Identity-labelled images from an ``.npz`` file or an image folder."""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import as_int, printable, printable_name, warn_user
from ..demo.data import (
    LabeledData,
    _from_paths,
    dim_16bit,
    dim_16bit_message,
    scan_imagefolder,
    unit_range,
)

__all__ = ["load_dataset", "load_npz", "load_image_folder", "camera_ids"]

#: a file or folder path: a ``str`` or a ``pathlib.Path`` (any ``os.PathLike`` of ``str``)
PathArg = Union[str, "os.PathLike[str]"]


def load_npz(path: PathArg, image_size: Optional[Tuple[int, int]] = None) -> LabeledData:
    """``images`` ``(N, H, W[, 1 | 3])`` (integers in 0..255, or up to 65535 for 16-bit data;
    finite floats, 0..255 ones divided by 255: :func:`~feature_cloud.demo.data.unit_range`),
    ``labels`` ``(N,)`` ints or strings (identity names, classes in sorted order), optional
    ``camids`` ``(N,)`` ints and ``subject_names``. Images
    become ``(N, 3, H, W)`` float in [0, 1], area-resized to ``image_size`` if given (no
    pickle is loaded). Refuses, naming the problem: missing arrays, other layouts (e.g.
    PyTorch's ``(N, C, H, W)``), non-finite pixels, labels that are not 1-D integers or strings
    of length ``N`` (or object arrays, which need pickle), camids that are not 1-D integers, and
    fewer than 2 identities. Every message names the file."""
    path = os.fspath(path)
    try:
        return _load_npz(path, image_size)
    except ValueError as err:
        if repr(path) in str(err):
            raise
        raise ValueError(f"{path!r}: {err}") from None


def _load_npz(path: str, image_size: Optional[Tuple[int, int]]) -> LabeledData:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not an .npz archive (np.savez writes one)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:  # a damaged archive
        raise ValueError(f"{path!r} is not a readable .npz archive ({err})") from None
    with archive as d:
        for key in ("images", "labels"):
            if key not in d.files:
                raise ValueError(f"{path!r} has no {key!r} array (found {d.files})")
        arrays = {}
        for key in ("images", "labels", "subject_names", "camids"):
            if key not in d.files:
                continue
            try:
                value = d[key]
            except ValueError as err:
                if "Object arrays cannot be loaded" in str(err):  # it would need pickle
                    raise ValueError(
                        f"{path!r}: {key!r} is an array of Python objects ({err}); save it with "
                        "a plain dtype, e.g. np.asarray(names, dtype=str) or integer ids"
                    ) from None
                raise ValueError(f"{path!r}: {key!r} cannot be read (damaged: {err})") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(f"{path!r}: {key!r} cannot be read (damaged: {err})") from None
            if value.dtype.byteorder not in "=|":  # big-endian data: native order for torch
                value = value.astype(value.dtype.newbyteorder("="))
            arrays[key] = value
        images, labels = arrays["images"], arrays["labels"]
        if "subject_names" in arrays and arrays["subject_names"].ndim != 1:
            raise ValueError(
                "subject_names must be 1-D (one name per label id), got shape "
                f"{arrays['subject_names'].shape}"
            )
        names = [str(n) for n in arrays["subject_names"]] if "subject_names" in arrays else None
        camids = arrays.get("camids")
    if labels.ndim != 1:
        hint = "; save labels.ravel()" if labels.ndim == 2 and 1 in labels.shape else ""
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}{hint}")
    if labels.dtype.kind not in "iuUS":
        hint = "; save labels.astype(int)" if labels.dtype.kind == "f" else ""
        raise ValueError(
            f"labels must be integers or strings (identity names), got {labels.dtype}{hint}"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images must be (N, H, W[, C]) with N = len(labels); got {images.shape}, "
            f"{labels.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{path!r} holds no images")
    if images.shape[3] not in (1, 3):
        hint = (
            "; it looks like (N, C, H, W): save images.transpose(0, 2, 3, 1)"
            if images.shape[1] in (1, 3)
            else "; RGBA? save images[..., :3]"
            if images.shape[3] == 4
            else ""
        )
        raise ValueError(
            f"images must be (N, H, W) or (N, H, W, C) with C = 1 or 3 channels last; got "
            f"{images.shape}{hint}"
        )
    if 0 in images.shape[1:3]:
        raise ValueError(f"images have zero size: {images.shape} (N, H, W, C)")
    kind = images.dtype.kind
    if kind in "iu":  # as a folder's: 0..255, or 0..65535 where they hold more (unit_range)
        depth = "int"
        if int(images.max()) <= 1:
            raise ValueError(
                f"integer images ({images.dtype}) hold only 0 and 1: floats in [0, 1] cast to "
                "integers (x.astype(np.uint8), (x / 255).astype(np.uint8)) would train on black "
                "images; save (x * 255).round().astype(np.uint8), or the floats themselves"
            )
    elif kind == "f":  # non-finite values refused by unit_range
        depth = "float"
    else:
        raise ValueError(f"images must be integers (0..255) or floats, got {images.dtype}")
    if camids is not None:
        if camids.shape != labels.shape or camids.dtype.kind not in "iu":
            raise ValueError(
                f"camids must be integers of shape {labels.shape} (one camera per image), got "
                f"{camids.dtype} {camids.shape}"
            )
    try:  # one rule with a folder's images (unit_range)
        unit = unit_range(images, depth)
    except ValueError as err:
        what = "float" if depth == "float" else "integer"
        raise ValueError(f"{what} images ({images.dtype}) hold {err}") from None
    if depth == "int" and dim_16bit(images):
        warn_user(dim_16bit_message(f"{path!r}: the images", float(images.max())))
    x = torch.from_numpy(unit).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="area")
    uniq, y = np.unique(labels, return_inverse=True)
    if uniq.size < 2:
        raise ValueError(f"{path!r} holds {uniq.size} identity: need at least 2")
    if labels.dtype.kind in "US":  # identity names: the classes in sorted name order
        class_names = [u.decode() if isinstance(u, bytes) else str(u) for u in uniq]
    elif names is None or len(names) != len(uniq):
        class_names = [str(u) for u in uniq]
    else:
        class_names = (
            [names[int(u)] for u in uniq]
            if uniq.min() >= 0 and uniq.max() < len(names)  # names index the labels
            else [str(u) for u in uniq]
        )
    info: Dict[str, Any] = {"path": os.path.abspath(path)}
    if camids is not None:
        info["has_camids"] = True
        info["camids_from"] = "the file's camids array"
    data = LabeledData(
        x.contiguous(),
        torch.as_tensor(y, dtype=torch.long),
        class_names,
        os.path.splitext(os.path.basename(path))[0],
        info,
    )
    data.camids = None if camids is None else torch.as_tensor(camids, dtype=torch.long)  # type: ignore[attr-defined]
    return data


#: a camera id in a file name, Market-1501 / DukeMTMC-reID style: ``0002_c1s1_000451_03.jpg``,
#: ``0005_c2_f0046985.jpg`` (the first ``_c<digits>``)
_CAMERA_IN_NAME = re.compile(r"_c(\d+)")


def camera_ids(paths: List[str]) -> Optional[torch.Tensor]:
    """The camera of each image from its file name (``<anything>_c<digits>...``, Market-1501 /
    DukeMTMC-reID style), or ``None`` unless every file name holds one."""
    cams = []
    for path in paths:
        match = _CAMERA_IN_NAME.search(os.path.basename(path))
        if match is None:
            return None
        cams.append(int(match.group(1)))
    too_big = [p for p, c in zip(paths, cams) if c >= 2**63]
    if too_big:
        raise ValueError(
            f"camera id (_c<digits>) too large for a 64-bit integer in {too_big[0]!r}"
            + (f" and {len(too_big) - 1} more files" if len(too_big) > 1 else "")
            + ": rename the files (the digits after _c are the camera)"
        )
    return torch.as_tensor(cams, dtype=torch.long) if cams else None


def _without_camera(paths: List[str], root: str, shown: int = 3) -> Optional[Dict[str, Any]]:
    """Where some file names hold a camera id (``_c<digits>``) and others do not (one misnamed
    file turns camera ids off for the whole folder): how many lack one, of how many, and the
    first ``shown`` of them (relative to ``root``); ``None`` where all or none hold one."""
    missing = [p for p in paths if _CAMERA_IN_NAME.search(os.path.basename(p)) is None]
    if not missing or len(missing) == len(paths):
        return None
    return {
        "count": len(missing),
        "of": len(paths),
        "files": [os.path.relpath(p, root) for p in missing[:shown]],
    }


def load_image_folder(path: PathArg, image_size: Tuple[int, int] = (64, 64)) -> LabeledData:
    """A folder with one sub-folder per identity (:func:`~feature_cloud.demo.data.scan_imagefolder`),
    each image read at its own size and area-resized to ``image_size`` (as :func:`load_npz`
    resizes). Camera ids come from the file names where every one is ``<anything>_c<digits>...``
    (Market-1501 / DukeMTMC-reID style), else there are none (where some hold one,
    ``info["camids_missing"]`` names the first files that do not). Every unreadable file is named
    in one error."""
    path = os.fspath(path)
    paths, ids = scan_imagefolder(path)
    data = _from_paths(paths, ids, tuple(image_size), "imagefolder", path, resize="area")  # type: ignore[arg-type]
    if data.num_classes < 2:
        raise ValueError(
            f"{path!r} holds {data.num_classes} identity (sub-folder): need at least 2"
        )
    camids = camera_ids(paths)
    data.info["title"] = os.path.basename(os.path.normpath(os.path.abspath(path)))
    if camids is not None:
        data.info["has_camids"] = True
        data.info["camids_from"] = "file names (_c<digits>)"
    else:
        missing = _without_camera(paths, path)
        if missing is not None:  # the run's first line and summary.md name them, and a
            # warning (s56 re-ID trial: --quiet showed nothing, and rank-1 read 6.0 among all
            # images where cross-camera gave 0.3)
            data.info["camids_missing"] = missing
            first = ", ".join(printable_name(f) for f in missing["files"])
            warn_user(
                f"{missing['count']} of {missing['of']} file names in {printable(path)!r} hold "
                f"no camera id _c<digits> (first: {first}): camera ids are off for the whole "
                "folder, so rank-1 / mAP are retrieval among all test images, not "
                "cross-camera; rename those files (<anything>_c<digits>...) for cross-camera "
                "retrieval"
            )
    data.camids = camids  # type: ignore[attr-defined]
    return data


def dataset_title(data: LabeledData) -> str:
    """The data's name in titles and messages: a folder's own name (its ``name`` stays
    ``"imagefolder"``, which runs compare to pool), else ``data.name``; a name's undecodable
    bytes and control characters as backslash escapes, on one line
    (:func:`~feature_cloud._validation.printable_name`)."""
    return printable_name(str(data.info.get("title", data.name)))


def _image_size(value: Any) -> Tuple[int, int]:
    """``image_size`` as two ints ``(H, W)`` >= 1 (NumPy integers, ``16.0``: taken); a
    ``TypeError`` / ``ValueError`` naming it otherwise."""
    what = "image_size (--image-size) must be two sizes >= 1 (H, W)"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        shown = tuple(value) if isinstance(value, (list, tuple)) else value
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{what}, got {shown}")
        raise TypeError(f"{what}, got {value!r}")
    size = tuple(as_int(v, "each of image_size (--image-size)") for v in value)
    if min(size) < 1:
        raise ValueError(f"{what}, got {size}")
    return size  # type: ignore[return-value]


def load_dataset(path: PathArg, image_size: Optional[Tuple[int, int]] = None) -> LabeledData:
    """An ``.npz`` file (see :func:`load_npz`) or a folder with one sub-folder per identity;
    ``path`` a ``str`` or a ``pathlib.Path``."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"path must be a str or pathlib.Path (a file or folder), got {path!r}")
    path = os.fspath(path)
    if image_size is not None:
        image_size = _image_size(image_size)
    if os.path.isdir(path):
        return load_image_folder(path, image_size or (64, 64))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such dataset file or folder: {path!r}")
    if not path.lower().endswith(".npz"):
        raise ValueError(f"dataset must be an .npz file or an image folder, got {path!r}")
    return load_npz(path, image_size)
