"""tqdm progress bars that can be silenced (tests, ``--quiet``)."""

from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of the demo on or off."""
    global _ENABLED
    _ENABLED = bool(enabled)


def is_enabled() -> bool:
    """Whether progress bars are shown."""
    return _ENABLED


def progress(iterable: Iterable[Any] = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when :func:`set_progress` turned bars off."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not _ENABLED or kwargs.pop("disable", False), **kwargs)
