"""Backend configurations shared by tests that build a :class:`viommu_backend.app.Backend`
in-process (unit and integration)."""

# The SMMU on bus 0 and the DMA test engine behind a root port (StreamID 0x100).
SMMU_TESTDEV = """
[[root_port]]
name = "rp0"
slot = 2
chassis = 1

[[function]]
name = "viommu"
kind = "smmuv3"
slot = 1

[[function]]
name = "dma0"
kind = "testdev"
port = "rp0"
"""
