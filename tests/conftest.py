"""Shared by all test kinds.  Tests import their helpers from the ``tests.support``
package and the fuzz targets from ``tests.fuzz``; fixtures live in each folder's
conftest.py."""
