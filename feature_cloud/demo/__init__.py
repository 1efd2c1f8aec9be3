"""The ``feature-cloud demo`` experiment: a long-tail split of real or synthetic data, every
method trained on the same backbone and budget, head/tail metrics, diagnostics and plots.

Layout: :mod:`.data` (sources), :mod:`.protocol` (LEAP's <H, S> split), :mod:`.methods`
(backbone + heads), :mod:`.metrics`, :mod:`.runner` (training and evaluation),
:mod:`.report` and :mod:`.plots` (re-rendered from a saved run by ``feature-cloud report``).
"""

from .data import DATA_SOURCES, LabeledData, SyntheticConfig, load_data
from .protocol import LongTailSplit, long_tail_split
from .report import load_results, render_report
from .runner import DemoConfig, run_demo

__all__ = [
    "DATA_SOURCES",
    "LabeledData",
    "SyntheticConfig",
    "load_data",
    "LongTailSplit",
    "long_tail_split",
    "DemoConfig",
    "run_demo",
    "load_results",
    "render_report",
]
