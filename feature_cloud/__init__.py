"""feature-cloud: long-tail representation learning heads and losses (LEAP and FTL) for PyTorch."""

from . import functional
from .checkpoints import check_state_dict, prepare_dcp_load
from .cloud import PAPER_LEAP, FeatureCloud
from .ftl import AlternatingScheduler, FTLModel
from .heads import LEAPMarginHead
from .regularizers import MetricL2
from .statistics import ClassStatistics
from .transfer import FeatureBatch, FeatureTransfer

#: the one place of the version (pyproject.toml reads it); 0.1.0 was the first release, whose
#: checkpoints still load
__version__ = "0.2.0.dev0"

__all__ = [
    "functional",
    "FeatureCloud",
    "PAPER_LEAP",
    "LEAPMarginHead",
    "MetricL2",
    "ClassStatistics",
    "__version__",
]
__all__ += ["FeatureTransfer", "FeatureBatch", "FTLModel", "AlternatingScheduler"]
__all__ += ["check_state_dict", "prepare_dcp_load"]


def _source_checkout_integrations() -> None:
    """Make ``feature_cloud.integrations`` resolve in a source checkout.

    The adapters live in the top-level ``integrations/`` folder, which the wheel installs as
    ``feature_cloud/integrations`` (setuptools ``package-dir``). When this package is imported
    straight from a checkout (``PYTHONPATH=.``), point the subpackage's search path there.
    """
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if (
        os.path.isdir(os.path.join(here, "integrations"))
        or "feature_cloud.integrations" in sys.modules
    ):
        return
    src = os.path.join(os.path.dirname(here), "integrations")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "feature_cloud.integrations", init, submodule_search_locations=[src]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_source_checkout_integrations()
del _source_checkout_integrations
