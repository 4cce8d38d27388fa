"""The device tree QEMU's virt machine generates (as dtc prints it), for the DT tests."""

from __future__ import annotations



VIRT_DTS = """/dts-v1/;

/ {
\tinterrupt-parent = <0x8002>;
\t#size-cells = <0x02>;
\t#address-cells = <0x02>;
\tcompatible = "linux,dummy-virt";

\tpcie@10000000 {
\t\tinterrupt-map-mask = <0x1800 0x00 0x00 0x07>;
\t\t#interrupt-cells = <0x01>;
\t\tranges = <0x1000000 0x00 0x00 0x00 0x3eff0000 0x00 0x10000>;
\t\treg = <0x40 0x10000000 0x00 0x10000000>;
\t\tmsi-map = <0x00 0x8003 0x00 0x10000>;
\t\tdma-coherent;
\t\tbus-range = <0x00 0xff>;
\t\t#size-cells = <0x02>;
\t\tdevice_type = "pci";
\t\tcompatible = "pci-host-ecam-generic";
\t\t#address-cells = <0x03>;
\t};

\tintc@8000000 {
\t\tphandle = <0x8002>;
\t\treg = <0x00 0x8000000 0x00 0x10000 0x00 0x80a0000 0x00 0xf60000>;
\t\t#redistributor-regions = <0x01>;
\t\tcompatible = "arm,gic-v3";
\t\tranges;
\t\t#size-cells = <0x02>;
\t\t#address-cells = <0x02>;
\t\tinterrupt-controller;
\t\t#interrupt-cells = <0x03>;

\t\tits@8080000 {
\t\t\tphandle = <0x8003>;
\t\t\treg = <0x00 0x8080000 0x00 0x20000>;
\t\t\t#msi-cells = <0x01>;
\t\t\tmsi-controller;
\t\t\tcompatible = "arm,gic-v3-its";
\t\t};
\t};

\tchosen {
\t\tbootargs = "console=ttyAMA0";
\t};
};
"""
