"""The pytest-benchmark modules' shared fixture: the allocator pinned for their timings."""

from __future__ import annotations

from typing import Dict

import pytest

from benchmarks.cases import pin_allocator


@pytest.fixture(autouse=True, scope="module")
def allocator() -> Dict[str, object]:
    """glibc's malloc thresholds pinned for a benchmark module's timings (:func:`pin_allocator`:
    why), recorded in every case's ``extra_info``; a fixture, so that importing a helper from
    a benchmark module (the smoke tests) pins nothing."""
    return pin_allocator()
