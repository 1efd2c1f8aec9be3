"""Framework adapters: ``feature_cloud.integrations.{pml, fastreid, timm}``.

Each adapter only translates configuration and calls the core Modules; importing this package
imports no framework. In the wheel this folder is installed as ``feature_cloud/integrations``.
"""

from __future__ import annotations


def _missing_framework(adapter: str, package: str, install: str, err: ImportError) -> ImportError:
    """The ``ImportError`` an adapter raises when its framework does not import: which adapter
    needs which package, how to install it, and the original error."""
    return ImportError(
        f"feature_cloud.integrations.{adapter} needs {package}, which does not import ({err}): "
        f"{install}"
    )
