"""virtio devices, split into reusable parts:

* :mod:`.pci` -- the virtio-pci modern transport (:class:`~.pci.VirtioPciFunction`):
  capabilities and BAR layout, common/ISR/notify registers, feature negotiation, the
  device status state machine, MSI-X or INTx/ISR interrupts, DEVICE_NEEDS_RESET.
* :mod:`.virtqueue` -- split virtqueues: descriptor chains, indirect tables, event idx,
  the used ring, malformed-chain detection; gather/scatter over a chain's buffers.

A device (e.g. :mod:`viommu_backend.endpoints.virtio_blk`) subclasses
``VirtioPciFunction`` with its device type and class code, ORs its feature bits into
``device_features``, and implements ``device_config()`` (built with
:func:`~.pci.config_bytes` from a register table) and ``handle_chain()``.
"""
