#!/bin/busybox sh
# viommu-backend guest init (busybox sh, arm64 initramfs).
#
# Prints machine-readable markers on the console, one per line:
#     VIOMMU-MARK: <name> <json>
# and runs the workloads named on the kernel command line, in order:
#     viommu.workload=enumerate,smmu,hotplug,mmio,...
# Parameters (kernel command line):
#     viommu.mmio=<bdf>/<bar>/<offset>/<width>[/<value>]+...   (width 8/16/32/64)
#     viommu.hotplug_count=N    viommu.hotplug_timeout=SECONDS
# Needs iomem=relaxed (IO_STRICT_DEVMEM) so that devmem reaches PCI BARs.
# Ends with `VIOMMU-MARK: done {...}` and poweroff -f (the host waits for both).

/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
PATH=/bin:/sbin

mark() { echo "VIOMMU-MARK: $1 $2"; }
fail() { mark error "{\"workload\":\"$1\",\"msg\":\"$2\"}"; ERRORS=$((ERRORS + 1)); }
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    echo "$2"
}
json_str() { printf '"%s"' "$1"; }
ERRORS=0

mark boot "{\"kernel\":\"$(uname -r)\",\"cmdline\":\"$(cat /proc/cmdline)\"}"
grep -qw iomem=relaxed /proc/cmdline || mark warning '{"msg":"iomem=relaxed missing: devmem cannot reach BARs"}'

# modules listed by the image builder, in dependency order
if [ -f /etc/viommu-modules ]; then
    while read -r ko; do
        [ -n "$ko" ] || continue
        if insmod "$ko" 2>/tmp/insmod.err; then
            mark module "{\"path\":\"$ko\",\"ok\":true}"
        else
            mark module "{\"path\":\"$ko\",\"ok\":false,\"err\":\"$(head -c 200 /tmp/insmod.err)\"}"
        fi
    done < /etc/viommu-modules
fi

pci_dev_json() {
    d=$1
    bdf=${d##*/}
    bars=""
    i=0
    while read -r start end flags; do
        [ $i -ge 7 ] && break
        if [ "$start" != "0x0000000000000000" ] || [ "$end" != "0x0000000000000000" ]; then
            bars="$bars${bars:+,}{\"index\":$i,\"start\":\"$start\",\"end\":\"$end\",\"flags\":\"$flags\"}"
        fi
        i=$((i + 1))
    done < "$d/resource"
    drv=""
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    grp=""
    [ -e "$d/iommu_group" ] && grp=$(basename "$(readlink "$d/iommu_group")")
    echo "{\"bdf\":\"$bdf\",\"vendor\":\"$(cat "$d/vendor")\",\"device\":\"$(cat "$d/device")\",\"class\":\"$(cat "$d/class")\",\"bars\":[$bars],\"driver\":\"$drv\",\"iommu_group\":\"$grp\"}"
}

wl_enumerate() {
    n=0
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/vendor" ] || continue
        mark pci-dev "$(pci_dev_json "$d")"
        n=$((n + 1))
    done
    mark enumerate "{\"count\":$n}"
}

bar_start() { # bdf bar -> start address (hex) of that BAR
    sed -n "$(($2 + 1))p" "/sys/bus/pci/devices/$1/resource" | cut -d' ' -f1
}

wl_mmio() {
    ops=$(arg viommu.mmio "")
    [ -n "$ops" ] || { fail mmio "no viommu.mmio= on the command line"; return; }
    for op in $(echo "$ops" | tr '+' ' '); do
        set -- $(echo "$op" | tr '/' ' ')
        bdf=$1; bar=$2; off=$3; width=$4; val=$5
        dev=/sys/bus/pci/devices/$bdf
        [ -d "$dev" ] || { fail mmio "no device $bdf"; continue; }
        [ "$(cat "$dev/enable")" = "0" ] && echo 1 > "$dev/enable"
        base=$(bar_start "$bdf" "$bar")
        addr=$(printf '0x%x' $((base + off)))
        if [ -n "$val" ]; then
            if devmem "$addr" "$width" "$val" 2>/tmp/devmem.err; then
                mark mmio-write "{\"bdf\":\"$bdf\",\"bar\":$bar,\"offset\":\"$off\",\"width\":$width,\"addr\":\"$addr\",\"value\":\"$val\"}"
            else
                fail mmio "devmem write $addr: $(head -c 200 /tmp/devmem.err)"
            fi
        else
            if v=$(devmem "$addr" "$width" 2>/tmp/devmem.err); then
                mark mmio-read "{\"bdf\":\"$bdf\",\"bar\":$bar,\"offset\":\"$off\",\"width\":$width,\"addr\":\"$addr\",\"value\":\"$v\"}"
            else
                fail mmio "devmem read $addr: $(head -c 200 /tmp/devmem.err)"
            fi
        fi
    done
}

wl_smmu() {
    # Route 1: the DT has an arm,smmu-v3 node at the BAR address of the IOMMU function;
    # its probe at boot failed (memory decode off).  Enable the function and re-probe.
    found=0
    for p in /sys/bus/platform/devices/*.smmuv3; do
        [ -e "$p" ] || continue
        found=1
        name=${p##*/}
        addr=0x${name%%.*}
        bdf=""
        for d in /sys/bus/pci/devices/*; do
            s=$(head -1 "$d/resource" | cut -d' ' -f1)
            [ $((s)) -eq $((addr)) ] && bdf=${d##*/}
        done
        [ -n "$bdf" ] || { fail smmu "no PCI function has BAR0 at $addr (DT reg mismatch)"; continue; }
        echo 1 > "/sys/bus/pci/devices/$bdf/enable"
        [ -e "$p/driver" ] || echo "$name" > /sys/bus/platform/drivers_probe
        ok=false
        [ -e "$p/driver" ] && ok=true
        units=$(ls /sys/class/iommu 2>/dev/null | tr '\n' ' ')
        mark smmu "{\"node\":\"$name\",\"bdf\":\"$bdf\",\"probed\":$ok,\"iommu\":\"$units\"}"
        [ "$ok" = true ] || fail smmu "arm-smmu-v3 did not bind $name"
    done
    [ $found = 1 ] || fail smmu "no smmuv3 platform device (DT without the node?)"
}

wl_hotplug() {
    want=$(arg viommu.hotplug_count 1)
    limit=$(arg viommu.hotplug_timeout 60)
    before=$(ls /sys/bus/pci/devices | wc -l)
    mark wait-hotplug "{\"devices\":$before,\"want\":$want}"
    t=0
    while [ $(($(ls /sys/bus/pci/devices | wc -l) - before)) -lt "$want" ]; do
        [ $t -ge $((limit * 10)) ] && { fail hotplug "timeout waiting for $want device(s)"; return; }
        sleep 0.1
        t=$((t + 1))
    done
    mark hotplug "{\"devices\":$(ls /sys/bus/pci/devices | wc -l)}"
}

wl_shell() {
    mark shell '{}'
    setsid cttyhack sh
}

for w in $(arg viommu.workload enumerate | tr ',' ' '); do
    mark workload "{\"name\":\"$w\"}"
    case "$w" in
        enumerate) wl_enumerate ;;
        mmio) wl_mmio ;;
        smmu) wl_smmu ;;
        hotplug) wl_hotplug ;;
        shell) wl_shell ;;
        none) ;;
        *) fail "$w" "unknown workload" ;;
    esac
done

mark done "{\"errors\":$ERRORS}"
if [ "$(arg viommu.keep 0)" = 1 ]; then
    mark idle '{}'
    while true; do sleep 3600; done
fi
poweroff -f
