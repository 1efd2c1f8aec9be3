"""Input checks shared by the Modules: clear exceptions before any state changes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def check_embeddings(embeddings: Tensor, embedding_size: int, name: str = "embeddings") -> None:
    """Type and shape of a ``(B, D)`` floating tensor (free: no device sync)."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {embeddings.dtype}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, {embedding_size}), got {tuple(embeddings.shape)}")
    if embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{name} has dimension {embeddings.shape[1]} but the module expects "
            f"embedding_size={embedding_size}"
        )


def check_labels(labels: Tensor, batch_size: int, name: str = "labels") -> None:
    """Type and shape of ``(B,)`` integer labels (free: no device sync)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"batch size mismatch: {batch_size} embeddings but {labels.shape[0]} {name}"
        )


def check_values(
    embeddings: Tensor, labels: Optional[Tensor], num_classes: int, label_name: str = "labels"
) -> None:
    """Value checks: labels in ``[0, C)`` or ``-1`` (ignored), finite embeddings.

    One host sync for all checks together; skipped while ``torch.compile`` traces (the compiled
    step stays sync-free) and when the caller passes ``validate=False`` to its Module.
    """
    if _compiling() or embeddings.numel() == 0:
        return
    flags = [~torch.isfinite(embeddings).all()]
    if labels is not None:
        flags.append(((labels < -1) | (labels >= num_classes)).any())
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise ValueError("embeddings contain NaN or Inf values")
    if labels is not None and bad[1]:
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(
            f"{label_name} must lie in [0, {num_classes}) or be -1 (ignored); "
            f"got values in [{lo}, {hi}]"
        )


def check_batch(
    embeddings: Tensor,
    labels: Tensor,
    embedding_size: int,
    num_classes: int,
    validate: bool = True,
) -> None:
    """All checks for an ``(embeddings, labels)`` training batch."""
    check_embeddings(embeddings, embedding_size)
    check_labels(labels, embeddings.shape[0])
    if validate:
        check_values(embeddings, labels, num_classes)
