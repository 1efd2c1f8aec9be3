"""The optional packages of the command line tool (``pip install 'feature-cloud[demo]'``)."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "need"]


class MissingExtra(ImportError):
    """An optional package that a feature of the tool needs is not installed; the message names
    the ``pip install`` that brings it."""


def need(module: str, purpose: str, package: str, extra: str = "demo") -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` saying that ``purpose``
    needs ``package`` and which extra of feature-cloud installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{purpose} needs {package}, which is not installed: pip install "
            f"'feature-cloud[{extra}]' (or pip install {package})"
        ) from None
