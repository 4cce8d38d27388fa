"""Shared by all test kinds.  Tests import their helpers from the ``tests.support``
package and the fuzz targets from ``tests.fuzz``; fixtures live in each folder's
conftest.py.

Hypothesis runs without its per-example deadline: a deadline is a timing check, and
timing belongs in the benchmarks (a loaded CI machine would fail it at random)."""

from hypothesis import settings

settings.register_profile("viommu", deadline=None)
settings.load_profile("viommu")
