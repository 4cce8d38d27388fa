"""The vfio-user "Backend Program Conventions" (docs/interop/vfio-user.rst): besides
``serve --socket-path=PATH`` / ``--fd=FDNUM`` (cli.py), SIGTERM honoured and no
daemonizing, a backend program comes with a JSON file under ``/usr/share/vfio-user``
telling management software what it is and how to start it.  The spec has no schema
yet; the fields follow vhost-user.json's ``@VhostUserBackend`` (description, type,
binary) plus what a management layer needs here (arguments, the options the program
takes, the PCI functions it can present).  Built from the code's own constants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from viommu_backend.endpoints import testdev, virtio_blk
from viommu_backend.endpoints.virtio import pci as virtio_pci
from viommu_backend.smmuv3 import function as smmu_function

DEFAULT_DIR = Path("/usr/share/vfio-user")
FILE_NAME = "viommu-backend.json"


def _pci(kind: str, vendor: int, device: int, klass: int) -> dict[str, str]:
    return {"kind": kind, "vendor-id": f"{vendor:#06x}", "device-id": f"{device:#06x}",
            "class": f"{klass:#08x}"}


def backend_description(binary: str) -> dict[str, Any]:
    return {
        "description": "viommu-backend: an Arm SMMUv3 (the IOMMU function) and DMA-capable "
                       "endpoints behind it, served over vfio-user",
        "type": "pci",
        "binary": binary,
        "arguments": ["serve"],
        "options": ["--socket-path=PATH", "--fd=FDNUM", "--function=NAME", "--config=FILE",
                    "--qmp=PATH"],
        "devices": [
            _pci("smmuv3", smmu_function.VENDOR_ID, smmu_function.DEVICE_ID, smmu_function.CLASS_CODE),
            _pci("testdev", testdev.VENDOR_ID, testdev.DEVICE_ID, testdev.CLASS_CODE),
            _pci("virtio-blk", virtio_pci.VENDOR_ID, virtio_blk.DEVICE_ID, virtio_blk.CLASS_CODE),
        ],
    }


def install_description(directory: Path, binary: str) -> Path:
    """Write ``directory/viommu-backend.json``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    path.write_text(json.dumps(backend_description(binary), indent=2) + "\n")
    return path
