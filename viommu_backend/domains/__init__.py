"""Host-side domain manager modelled on Linux iommufd (IOAS, HWPTs, devices, faults)."""

from .manager import (ABORT, ABORT_NAME, DmaFault, DomainManager, TranslationResult,
                      fault_name)
from .objects import (BusyError, Device, DomainError, FaultQueue, FaultResponse, GroupError,
                      Hwpt, HwptBlocking, HwptNested, HwptPaging, Ioas, PendingFault)

__all__ = ["ABORT", "ABORT_NAME", "DmaFault", "DomainManager", "TranslationResult",
           "fault_name", "BusyError", "Device", "DomainError", "FaultQueue", "FaultResponse",
           "GroupError", "Hwpt", "HwptBlocking", "HwptNested", "HwptPaging", "Ioas",
           "PendingFault"]
