"""Coverage-guided fuzz targets (atheris): one module per target, each with
``one_input(data: bytes)`` (raises :class:`Finding` on a bug), ``seeds()`` (the seed
corpus) and ``STATS`` (its counters).  Run by scripts/fuzz; replayed by
tests/unit/test_fuzz_smoke.py."""

TARGETS = ("vfio_user", "qmp", "tables", "cmdq", "virtqueue")
