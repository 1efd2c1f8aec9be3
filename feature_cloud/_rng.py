"""Where 0.1.0's ``CloudRNG`` (the cloud's ``torch.Generator`` and its state) lived.

Nothing uses it: whole-module pickles of 0.1.0 heads name ``feature_cloud._rng.CloudRNG``, and
unpickling one failed with ``ModuleNotFoundError`` before the head could say what to do. With
this placeholder the pickle gets as far as the head, which refuses it by name with the upgrade
path (:meth:`feature_cloud.cloud.WithFeatureCloud.__setstate__`: load it with 0.1.0, save its
``state_dict()``).
"""

from __future__ import annotations


class CloudRNG:
    """A placeholder for 0.1.0's class of that name: only an old pickle's state lands here."""
