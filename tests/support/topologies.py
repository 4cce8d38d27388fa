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

# The same with a hidden stage 2: the guest sees a stage-1-only SMMU, the host owns
# stage 2 and places guest RAM reversed in its physical memory (IPA != PA).
SMMU_TESTDEV_HOST_S2 = SMMU_TESTDEV.replace(
    'kind = "smmuv3"\nslot = 1\n',
    'kind = "smmuv3"\nslot = 1\noptions = { host_s2 = true, host_pa = "reversed" }\n')
