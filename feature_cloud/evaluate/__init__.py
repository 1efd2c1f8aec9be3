"""``feature-cloud evaluate``: real-data evaluation of LEAP and FTL against their own baselines.

Reads identity-labelled images (an ``.npz`` with ``images``, ``labels``, optional ``camids``, or
one folder per identity), splits them by the natural long tail or LEAP's ``<H, S>`` protocol
(closed set) or holds identities out whole (open set: retrieval and verification),
trains every method on the same backbone, budget and batch order per seed, and reports head/tail
metrics with **paired** differences of each method against its own baseline and 95% t-intervals
(Markdown, CSV, JSON, PNG). The metrics, method builders, progress bars and plot helpers are
those of :mod:`feature_cloud.demo`.

From Python (README "From Python"): :func:`run_evaluation` of an :class:`EvalConfig` is
``feature-cloud evaluate``; :func:`compare_runs` is ``report A B --compare``,
:func:`merge_runs` ``report A B --out M`` (pooling seeds), :func:`combine_settings` the table of
several ``-S``, :func:`set_progress` the progress bars of ``--quiet``. The report's functions
give points (``100 *``), :func:`paired_differences` and ``results["runs"]`` fractions.
"""

from ..demo._progress import set_progress
from .backbones import BACKBONES, build_backbone
from .data import load_dataset
from .methods import BASELINES, EVAL_METHODS, with_baselines
from .protocol import hs_split, natural_split, open_split
from .report import combine_settings, compare_runs, merge_runs, render_evaluation
from .runner import EvalConfig, TrainingDiverged, run_evaluation
from .stats import paired_differences, t_interval

__all__ = [
    "load_dataset",
    "natural_split",
    "hs_split",
    "open_split",
    "BACKBONES",
    "build_backbone",
    "EVAL_METHODS",
    "BASELINES",
    "with_baselines",
    "paired_differences",
    "t_interval",
    "EvalConfig",
    "run_evaluation",
    "TrainingDiverged",
    "render_evaluation",
    "compare_runs",
    "merge_runs",
    "combine_settings",
    "set_progress",
]
