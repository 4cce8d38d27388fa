"""Kernel-CI formats for boot and matrix runs: the checks a run made (``checks``), KCIDB
objects (``kcidb``), LAVA job definitions (``lava``)."""
