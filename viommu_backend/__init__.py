"""viommu-backend: an out-of-process Arm SMMUv3 vIOMMU for QEMU, served over vfio-user."""

__version__ = "0.1.0"
