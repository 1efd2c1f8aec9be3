"""tqdm progress bars that can be silenced (tests, ``--quiet``); none without tqdm, and none
where stderr is neither a terminal nor a Jupyter kernel's stream (a log file, a pipe: bars would
write a carriage-return frame per update there; the per-run lines on stdout say the progress)."""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Optional

try:
    from tqdm.auto import tqdm
except ImportError:  # an optional extra: the tool runs without bars
    tqdm = None

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of the demo on or off."""
    global _ENABLED
    _ENABLED = bool(enabled)


def is_enabled() -> bool:
    """Whether progress bars are shown."""
    return _ENABLED


class _NoBar:
    """What the tool uses of a tqdm bar, doing nothing (tqdm is not installed)."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, **_: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _on_terminal(stream: Any) -> bool:
    """Whether ``stream`` (the bars' file) is a terminal (not a file, pipe or closed stream),
    or a Jupyter kernel's stream (``tqdm.auto`` draws a notebook widget there)."""
    if type(stream).__module__.startswith("ipykernel."):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress(iterable: Optional[Iterable[Any]] = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, disabled when :func:`set_progress` turned bars off or the
    bars' stream (stderr) is not a terminal (a bar that does nothing where tqdm is not
    installed)."""
    if tqdm is None:
        return _NoBar(iterable)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    disable = kwargs.pop("disable", False)
    shown = _ENABLED and not disable and _on_terminal(kwargs.get("file") or sys.stderr)
    return tqdm(iterable, disable=not shown, **kwargs)
