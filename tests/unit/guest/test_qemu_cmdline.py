"""QEMU command line from a config, console marker parsing."""

import json
from pathlib import Path

from viommu_backend.config import load_default, loads_config
from viommu_backend.guest.qemu import function_device, kernel_cmdline, parse_marker, qemu_args
from viommu_backend.guest.toolroot import QemuCommand, parse_qemu_version

K, I, S = Path("/c/Image"), Path("/c/initrd.gz"), Path("/run/v")


def opt_values(args: list[str], opt: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == opt]


def test_default_config_command_line():
    c = load_default()
    args = qemu_args(c, kernel=K, initrd=I, socket_dir=S, qmp_path=S / "q.sock", dtb=Path("/c/g.dtb"))
    assert opt_values(args, "-machine") == ["virt,gic-version=3,memory-backend=mem"]
    assert opt_values(args, "-cpu") == ["max"]
    assert opt_values(args, "-m") == ["1024M"]
    assert opt_values(args, "-object") == ["memory-backend-memfd,id=mem,size=1024M,share=on"]
    assert opt_values(args, "-nic") == ["none"]
    assert "-nographic" in args and opt_values(args, "-monitor") == ["none"]
    assert opt_values(args, "-kernel") == [str(K)] and opt_values(args, "-initrd") == [str(I)]
    assert opt_values(args, "-dtb") == ["/c/g.dtb"]
    assert opt_values(args, "-qmp") == [f"unix:{S}/q.sock,server=on,wait=off"]
    devs = opt_values(args, "-device")
    assert devs[0] == "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x2"
    # only the function present at boot; blk0 is hot-plugged later
    assert len(devs) == 2
    assert json.loads(devs[1]) == {
        "driver": "vfio-user-pci", "id": "viommu", "bus": "pcie.0", "addr": "0x1",
        "socket": {"path": "/run/v/viommu.sock", "type": "unix"},
    }
    append = opt_values(args, "-append")[0].split()
    assert {"console=ttyAMA0", "iomem=relaxed", "viommu.hotplug_count=1"} <= set(append)
    assert "viommu.workload=enumerate,smmu,hotplug,blk,unplug" in append


def test_dumpdtb_variant_drops_devices_and_dtb():
    c = load_default()
    args = qemu_args(c, kernel=K, initrd=I, socket_dir=S, qmp_path=S / "q.sock", dtb=Path("/g.dtb"),
                     dumpdtb=Path("/o.dtb"))
    assert opt_values(args, "-machine") == ["virt,gic-version=3,memory-backend=mem,dumpdtb=/o.dtb"]
    assert "-dtb" not in args and "-qmp" not in args
    assert all("vfio-user" not in d for d in opt_values(args, "-device"))


def test_hotplug_device_behind_root_port():
    c = load_default()
    assert function_device(c.function("blk0"), S) == {
        "driver": "vfio-user-pci", "id": "blk0", "bus": "rp0", "addr": "0x0",
        "socket": {"path": "/run/v/blk0.sock", "type": "unix"},
    }


def test_machine_options_from_config():
    c = loads_config('[machine]\nmemory = "2G"\ncpus = 4\ncpu = "neoverse-n1"\n'
                     'extra_args = ["-d", "guest_errors"]\n'
                     '[guest]\ncmdline = "foo=1"\nworkload = "mmio"\n'
                     '[[function]]\nname = "ep0"\nkind = "testdev"\nslot = 5\n')
    args = qemu_args(c, kernel=K, initrd=I, socket_dir=S)
    assert opt_values(args, "-m") == ["2048M"] and opt_values(args, "-smp") == ["4"]
    assert opt_values(args, "-cpu") == ["neoverse-n1"]
    assert args[-2:] == ["-d", "guest_errors"]
    assert "-qmp" not in args and "-dtb" not in args
    assert json.loads(opt_values(args, "-device")[0])["addr"] == "0x5"
    line = kernel_cmdline(c, "x=2")
    assert line.endswith("viommu.workload=mmio foo=1 x=2") and "hotplug_count" not in line


def test_parse_marker():
    m = parse_marker('[    2.1] VIOMMU-MARK: pci-dev {"bdf":"0000:00:01.0","bars":[]}', 1.5)
    assert m is not None and m.name == "pci-dev" and m.data == {"bdf": "0000:00:01.0", "bars": []}
    assert m.time == 1.5
    assert parse_marker("VIOMMU-MARK: done").data is None
    assert parse_marker("VIOMMU-MARK: bad {not json").data == {"raw": "{not json"}
    assert parse_marker("no marker here") is None
    assert parse_marker("VIOMMU-MARK: ") is None


def test_qemu_command_and_version():
    q = QemuCommand(("/r/ld.so", "--library-path", "/r/lib", "/r/qemu", "-L", "/r/share"), (11, 1, 3),
                    "toolroot", {"QEMU_MODULE_DIR": "/r/mods"})
    assert q.command("-M", "virt")[-3:] == ["/r/share", "-M", "virt"]
    assert q.environ()["QEMU_MODULE_DIR"] == "/r/mods"
    assert parse_qemu_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)") == (11, 1, 3)
    assert parse_qemu_version("QEMU emulator version 7.2.0") == (7, 2, 0)
    assert parse_qemu_version("nonsense") is None


def test_multi_function_device_arguments():
    c = loads_config('[[root_port]]\nname = "rp0"\nslot = 2\n'
                     '[[function]]\nname = "e0"\nkind = "testdev"\nport = "rp0"\n'
                     '[[function]]\nname = "e1"\nkind = "testdev"\nport = "rp0"\nfunc = 1\n')
    devs = [json.loads(d) for d in opt_values(qemu_args(c, kernel=K, initrd=I, socket_dir=S), "-device")
            if d.startswith("{")]
    assert [(d["id"], d["bus"], d["addr"], d.get("multifunction")) for d in devs] == [
        ("e0", "rp0", "0x0.0", True), ("e1", "rp0", "0x0.1", True)]


def test_parse_marker_survives_a_kernel_message_before_its_newline():
    line = ('VIOMMU-MARK: pasid {"ok":true,"pasids":[1,1100]}arm-smmu-v3 8000200000.smmuv3: '
            'event 0x0a received:')
    m = parse_marker(line)
    assert m is not None and m.name == "pasid" and m.data == {"ok": True, "pasids": [1, 1100]}
    cut = parse_marker('VIOMMU-MARK: pasid {"ok":tr')  # a line cut inside the JSON stays visible
    assert cut is not None and cut.data == {"raw": '{"ok":tr'}
