"""Optional packages: the error that names the ``pip install`` which brings a missing one (the
command line tool's extras, the adapters' frameworks)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ["MissingExtra", "missing", "need"]


class MissingExtra(ModuleNotFoundError):
    """A package that a feature needs does not import; the message names the install, and
    ``name`` the module that is missing (as Python's own ``ModuleNotFoundError``)."""


def missing(
    purpose: str, package: str, install: str, cause: Optional[BaseException] = None
) -> MissingExtra:
    """``"<purpose> needs <package>, which does not import[ (cause)]: <install>"``."""
    detail = "" if cause is None else f" ({cause})"
    name = getattr(cause, "name", None) or package
    return MissingExtra(
        f"{purpose} needs {package}, which does not import{detail}: {install}", name=name
    )


def need(module: str, purpose: str, package: str, extra: str = "demo") -> ModuleType:
    """``importlib.import_module(module)``, or :func:`missing` naming the feature-cloud extra
    that installs ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(
            purpose, package, f"pip install 'feature-cloud[{extra}]' (or pip install {package})"
        ) from None
