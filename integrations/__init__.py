"""Framework adapters: ``feature_cloud.integrations.{pml, fastreid, timm}``.

Each adapter only translates configuration and calls the core Modules; importing this package
imports no framework. In the wheel this folder is installed as ``feature_cloud/integrations``.
"""
