"""Identity-labelled images from an ``.npz`` file or an image folder."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..demo.data import LabeledData, load_imagefolder

__all__ = ["load_dataset", "load_npz"]


def load_npz(path: str, image_size: Optional[Tuple[int, int]] = None) -> LabeledData:
    """``images`` ``(N, H, W[, 3])`` uint8 or float, ``labels`` ``(N,)`` ints, optional ``camids``
    and ``subject_names``. Images become ``(N, 3, H, W)`` float in [0, 1], area-resized to
    ``image_size`` if given (no pickle is loaded)."""
    with np.load(path, allow_pickle=False) as d:
        for key in ("images", "labels"):
            if key not in d.files:
                raise ValueError(f"{path!r} has no {key!r} array (found {d.files})")
        images, labels = d["images"], d["labels"]
        names = [str(n) for n in d["subject_names"]] if "subject_names" in d.files else None
        camids = d["camids"] if "camids" in d.files else None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images must be (N, H, W[, C]) with N = len(labels); got {images.shape}, "
            f"{labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="area")
    uniq, y = np.unique(labels, return_inverse=True)
    if names is None or len(names) != len(uniq):
        class_names = [str(u) for u in uniq]
    else:
        class_names = (
            [names[int(u)] for u in uniq] if uniq.max() < len(names) else [str(u) for u in uniq]
        )
    info = {"path": os.path.abspath(path)}
    if camids is not None:
        info["has_camids"] = True
    data = LabeledData(
        x.contiguous(),
        torch.as_tensor(y, dtype=torch.long),
        class_names,
        os.path.splitext(os.path.basename(path))[0],
        info,
    )
    data.camids = None if camids is None else torch.as_tensor(camids, dtype=torch.long)  # type: ignore[attr-defined]
    return data


def load_dataset(path: str, image_size: Optional[Tuple[int, int]] = None) -> LabeledData:
    """An ``.npz`` file (see :func:`load_npz`) or a folder with one sub-folder per identity."""
    if os.path.isdir(path):
        data = load_imagefolder(path, image_size or (64, 64))
        data.camids = None  # type: ignore[attr-defined]
        return data
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such dataset file or folder: {path!r}")
    if not path.endswith(".npz"):
        raise ValueError(f"dataset must be an .npz file or an image folder, got {path!r}")
    return load_npz(path, image_size)
