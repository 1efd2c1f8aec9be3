"""Framework adapters: ``feature_cloud.integrations.{pml, fastreid, timm}``.

Each adapter only translates configuration and calls the core Modules; importing this package
imports no framework. In the wheel this folder is installed as ``feature_cloud/integrations``.
"""

if __name__ == "integrations":  # this folder imported by its own name from a source checkout
    raise ImportError(
        "import the adapters as feature_cloud.integrations (e.g. from "
        "feature_cloud.integrations.pml import LEAPLoss): 'integrations' is that package's "
        "folder, and importing it under a second name loads every adapter twice (fastreid's "
        "registry then refuses LEAPHead)"
    )
