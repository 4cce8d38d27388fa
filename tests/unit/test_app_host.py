"""The backend's host-side set-up from the config: a hidden stage 2 (SMMU options host_s2,
host_pa), endpoints bound with their groups and coherency, the host's PRI hook."""

from __future__ import annotations


import pytest

from viommu_backend.app import Backend
from viommu_backend.config import ConfigError, loads_config
from viommu_backend.domains.host import HostIoas
from viommu_backend.smmuv3 import regs

from tests.support.topologies import SMMU_TESTDEV
from tests.support import CONFIGS

REPO_CONFIG = CONFIGS / "iommufd-group.toml"

MULTI = """
[[function]]
name = "viommu"
kind = "smmuv3"
slot = 1
options = { host_s2 = true, host_pa = "reversed" }

[[function]]
name = "f0"
kind = "testdev"
slot = 3
options = { stream_id = 0x200 }

[[function]]
name = "f1"
kind = "testdev"
slot = 4
options = { stream_id = 0x201, enforce_cc = false }

[[function]]
name = "f2"
kind = "testdev"
slot = 5
options = { stream_id = 0x300, group = "pair" }

[[function]]
name = "f3"
kind = "testdev"
slot = 6
options = { stream_id = 0x400, group = "pair" }

[[function]]
name = "f4"
kind = "testdev"
slot = 7
options = { stream_id = 0x500 }
"""


def backend(text: str, tmp_path) -> Backend:
    return Backend(loads_config(text, "<test>"), tmp_path)


def test_host_s2_hides_stage2_from_the_guest(tmp_path):
    be = backend(MULTI, tmp_path)
    idr0 = regs.IDR0.layout.decode(be.iommu.smmu.config.idr0())
    assert idr0["S2P"] == 0 and idr0["S1P"] == 1
    m = be.manager
    assert m.host_s2 and isinstance(m.ioas, HostIoas) and m.ioas.host.layout == "reversed"
    plain = backend(SMMU_TESTDEV, tmp_path / "plain")
    assert regs.IDR0.layout.decode(plain.iommu.smmu.config.idr0())["S2P"] == 1
    assert not plain.manager.host_s2


def test_endpoints_are_bound_with_groups_and_coherency(tmp_path):
    m = backend(MULTI, tmp_path).manager
    devs = {d.name: d for d in m.devices.values()}
    assert set(devs) == {"f0", "f1", "f2", "f3", "f4"}
    # functions 0 and 1 of one device (no ACS) share a group; the config names another
    assert devs["f0"].group == devs["f1"].group == "02:00"
    assert devs["f2"].group == devs["f3"].group == "pair" and devs["f4"].group is None
    assert devs["f1"].can_enforce_coherency is False and devs["f0"].can_enforce_coherency
    assert set(m.iopf_hooks) == {0x200, 0x201, 0x300, 0x400, 0x500}  # testdevs have PRI


@pytest.mark.parametrize("options, message", [
    ("{ host_s2 = 1 }", "host_s2: true or false"),
    ('{ host_s2 = true, host_pa = "shuffled" }', "host_pa: one of identity, reversed"),
    ('{ host_pa = "reversed" }', "only with host_s2"),
    ("{ host_s2 = true, s2p = true }", "contradicts host_s2"),
])
def test_bad_host_options(tmp_path, options, message):
    text = SMMU_TESTDEV.replace('kind = "smmuv3"\nslot = 1',
                                f'kind = "smmuv3"\nslot = 1\noptions = {options}')
    with pytest.raises(ConfigError, match=message):
        backend(text, tmp_path)


@pytest.mark.parametrize("options, message", [
    ('{ enforce_cc = "no" }', "enforce_cc: true or false"),
    ("{ group = true }", "group: a name or a number"),
])
def test_bad_endpoint_options(tmp_path, options, message):
    text = SMMU_TESTDEV.replace('kind = "testdev"\nport = "rp0"',
                                f'kind = "testdev"\nport = "rp0"\noptions = {options}')
    with pytest.raises(ConfigError, match=message):
        backend(text, tmp_path)


def test_functions_of_one_device_behind_a_port_share_a_group(tmp_path):
    m = backend(REPO_CONFIG.read_text(), tmp_path).manager  # qemu_configs/iommufd-group.toml
    devs = {d.name: d for d in m.devices.values()}
    assert devs["eng0"].group == devs["eng1"].group == "01:00"
    assert m.group_of(devs["eng0"]) == [devs["eng0"], devs["eng1"]]
