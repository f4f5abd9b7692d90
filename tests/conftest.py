"""Shared pytest configuration: hypothesis profiles and thread-count hygiene.

Profiles (select with ``HYPOTHESIS_PROFILE=<name>``; default ``dev``):

- ``dev``: 25 examples per property, no deadline (kernels may be slow on a
  loaded 2-core machine).
- ``ci``: 50 examples per property, derandomized so CI runs are
  reproducible.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("ci", max_examples=50, derandomize=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _restore_num_threads():
    """Undo any ``bnfast.set_num_threads`` a test makes, so tests stay independent."""
    try:
        import bnfast
        before = bnfast.get_num_threads()
    except Exception:  # module not built / not importable: nothing to restore
        yield
        return
    yield
    bnfast.set_num_threads(before)
