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
#     viommu.blk_dev=vda  viommu.blk_bytes=4194304  viommu.blk_sizes=4096,65536,1048576
#     `blk:DEV` runs the blk workload on /dev/DEV instead of viommu.blk_dev
#     `blkbench:BS:BYTES:LAYOUT` one case of scripts/bench_guest_dma (/bin/blk_bench)
#     viommu.endpoint_msi=0|1  (hotplug: 0 = no MSI for devices behind root ports, see below)
#     viommu.unplug_busy=0|1  (unplug: keep O_DIRECT I/O running while the device goes)
#     viommu.host_timeout=SECONDS  (host: how long to wait for the host's answer)
# Workloads `dma-api`, `pasid`, `sva`, `httu`: the DMA engine's checks, run by
# /bin/viommu_dma_test through its driver /dev/viommu-dma (kernels built from source).
# Workload `host`: the guest asks the host what to do next, in a loop:
#     VIOMMU-MARK: wait-host {"n":N}
# and reads one line from the console: workload words to run (e.g. `io` or `io:4096`), or
# `end`.  After running them it dumps the new kernel log lines and marks
# `host-step {"n":N,"ran":...}`.  The host may act first (e.g. inject a fault over QMP).
# With viommu.keep=1 the guest runs the same loop after `done`, without a time limit.
# Workload `io[:BYTES[:read|:write]]`: one O_DIRECT write / read-back / compare of BYTES
# (default 65536, bs 4096) at the start of the disk (`:read`: only the read-back of what the
# last io wrote; `:write`: only the write); reports `io {...}`, the verdict is the host's.
# Workload `busmaster:BDF`: sets Memory Space and Bus Master Enable in the command register
# of a function no driver owns (the host then drives its DMA); reports `busmaster {...}`.
# After every workload the new kernel log lines of level <= 4 (warn) and every line that
# mentions smmu/iommu are printed as `kmsg {"level":N,"text":...}` markers (the host
# decides which are expected).
# Needs iomem=relaxed (IO_STRICT_DEVMEM) so that devmem reaches PCI BARs.
# Ends with `VIOMMU-MARK: done {...}`, waits for the host's `poweroff` line (at most
# viommu.done_wait s), then poweroff -f (the host waits for both).

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

now_ms() { # milliseconds since boot (10 ms resolution: /proc/uptime)
    read -r u _ < /proc/uptime
    frac=${u#*.}
    echo $(( ${u%.*} * 1000 + (1$frac - 100) * 10 ))
}

KSEEN=0
kmsg_dump() {
    # new kernel log lines since the last call: warnings/errors and smmu/iommu lines
    dmesg -r > /tmp/kmsg 2>/dev/null || return 0
    total=$(wc -l < /tmp/kmsg)
    tail -n +$((KSEEN + 1)) /tmp/kmsg | sed 's/\\/\\\\/g; s/"/\\"/g; s/\t/ /g' > /tmp/kmsg.new
    KSEEN=$total
    while IFS= read -r line; do
        case "$line" in "<"*">"*) ;; *) continue ;; esac
        lvl=${line#<}; lvl=${lvl%%>*}
        lvl=$((lvl & 7))
        text=${line#*>}
        text=${text#\[*\] }
        if [ $lvl -le 4 ]; then
            mark kmsg "{\"level\":$lvl,\"text\":\"$text\"}"
        else
            case "$text" in
                *[Ss][Mm][Mm][Uu]*|*[Ii][Oo][Mm][Mm][Uu]*) mark kmsg "{\"level\":$lvl,\"text\":\"$text\"}" ;;
            esac
        fi
    done < /tmp/kmsg.new
}

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

no_msi_behind_bridges() {
    # Endpoints behind the SMMU must not use MSI/MSI-X: dma-iommu gives them a doorbell
    # *IOVA* (the SMMU's software MSI window), but QEMU delivers vfio-user MSIs itself,
    # untranslated, so every completion interrupt would be lost.  msi_bus=0 on a bridge
    # forbids MSI below it (the port keeps its own MSI for pciehp): they use INTx.
    for d in /sys/bus/pci/devices/*; do
        case "$(cat "$d/class")" in 0x0604*) echo 0 > "$d/msi_bus" 2>/dev/null && mark no-msi "{\"bridge\":\"${d##*/}\"}" ;; esac
    done
}

wl_hotplug() {
    [ "$(arg viommu.endpoint_msi 0)" = 1 ] || no_msi_behind_bridges
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

blk_pci_bdf() { # block device name -> the PCI function under it ("" if none)
    p=$(readlink -f "/sys/block/$1/device" 2>/dev/null) || return 0
    while [ -n "$p" ] && [ "$p" != / ]; do
        case "${p##*/}" in [0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:*) echo "${p##*/}"; return 0 ;; esac
        p=${p%/*}
    done
}

wait_blk() { # DEV: wait up to 30 s for /dev/DEV (a hot-plugged disk appears some time
    # after its PCI function: the driver probes it); sets t (tenths of a second waited)
    t=0
    while [ ! -b "/dev/$1" ]; do
        [ $t -ge 300 ] && return 1
        sleep 0.1
        t=$((t + 1))
    done
}

blk_dev_mark() { # WORKLOAD DEV: wait for /dev/DEV, mark blk-dev (where it sits: PCI function,
    # iommu group and domain type); sets bdf, grp and bytes; fails WORKLOAD after 30 s
    dev=$2
    wait_blk "$dev" || { fail "$1" "no /dev/$dev after 30 s"; return 1; }
    bdf=$(blk_pci_bdf "$dev")
    grp=""
    [ -n "$bdf" ] && [ -e "/sys/bus/pci/devices/$bdf/iommu_group" ] && \
        grp=$(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu_group")")
    dtype=""
    [ -n "$grp" ] && [ -e "/sys/kernel/iommu_groups/$grp/type" ] && dtype=$(cat "/sys/kernel/iommu_groups/$grp/type")
    unit=""  # the IOMMU instance (e.g. smmu3.0x0000008000200000) the function sits behind
    [ -n "$bdf" ] && [ -e "/sys/bus/pci/devices/$bdf/iommu" ] && \
        unit=$(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu")")
    bytes=$(( $(cat "/sys/block/$dev/size") * 512 ))
    mark blk-dev "{\"dev\":\"$dev\",\"bdf\":\"$bdf\",\"iommu_group\":\"$grp\",\"iommu\":\"$unit\",\"domain_type\":\"$dtype\",\"bytes\":$bytes,\"waited_ms\":$((t * 100))}"
}

wl_blk() { # [DEV]
    # O_DIRECT write / read-back / compare on the virtio-blk disk behind the SMMU
    total=$(arg viommu.blk_bytes 4194304)
    sizes=$(arg viommu.blk_sizes 4096,65536,1048576)
    blk_dev_mark blk "${1:-$(arg viommu.blk_dev vda)}" || return
    [ -n "$grp" ] || fail blk "$dev ($bdf) has no iommu group: its DMA does not go through the SMMU"
    off=0
    for bs in $(echo "$sizes" | tr ',' ' '); do
        n=$((total / bs))
        [ $n -ge 1 ] || { fail blk "block size $bs larger than $total bytes"; continue; }
        len=$((n * bs))
        if [ $((off + len)) -gt "$bytes" ]; then fail blk "disk too small for $len bytes at $off"; break; fi
        head -c "$len" /dev/urandom > /tmp/blk.src
        want=$(md5sum < /tmp/blk.src | cut -d' ' -f1)
        t0=$(now_ms)
        if ! dd if=/tmp/blk.src of="/dev/$dev" bs="$bs" count="$n" seek=$((off / bs)) oflag=direct conv=notrunc 2>/tmp/dd.err; then
            fail blk "O_DIRECT write bs=$bs: $(tail -n 3 /tmp/dd.err | tr '\n"' ' _')"; off=$((off + len)); continue
        fi
        t1=$(now_ms)
        if ! dd if="/dev/$dev" of=/tmp/blk.dst bs="$bs" count="$n" skip=$((off / bs)) iflag=direct 2>/tmp/dd.err; then
            fail blk "O_DIRECT read bs=$bs: $(tail -n 3 /tmp/dd.err | tr '\n"' ' _')"; off=$((off + len)); continue
        fi
        t2=$(now_ms)
        got=$(md5sum < /tmp/blk.dst | cut -d' ' -f1)
        match=false
        [ "$want" = "$got" ] && match=true
        mark blk-io "{\"dev\":\"$dev\",\"bs\":$bs,\"bytes\":$len,\"offset\":$off,\"write_ms\":$((t1 - t0)),\"read_ms\":$((t2 - t1)),\"md5\":\"$want\",\"read_md5\":\"$got\",\"match\":$match}"
        [ $match = true ] || fail blk "bs=$bs: read back $got, wrote $want"
        off=$((off + len))
    done
    rm -f /tmp/blk.src /tmp/blk.dst
}

# Workload `blkbench:BS:BYTES:LAYOUT` (one case of scripts/bench_guest_dma, typed by the host
# through `host`): /bin/blk_bench's O_DIRECT write + read back + compare of BYTES on
# /dev/<viommu.blk_dev> in BS requests from one buffer of a fixed physical LAYOUT
# (contiguous: a transparent huge page; scattered: separate 4 KiB pages), checked through
# /proc/self/pagemap; it marks `blk-bench {...}`.  `blkbench` with no case, run before
# the host's: waits for the disk and marks `blk-dev` (whether it sits behind an IOMMU is
# the host's verdict) and, if transparent huge pages are off, turns them on for madvise.
BENCH_N=0
wl_blkbench() { # [BS:BYTES:LAYOUT]
    if [ -z "$1" ]; then
        blk_dev_mark blkbench "$(arg viommu.blk_dev vda)" || return
        thp=/sys/kernel/mm/transparent_hugepage/enabled
        grep -q '\[never\]' $thp 2>/dev/null && echo madvise > $thp
        return
    fi
    BENCH_N=$((BENCH_N + 1))
    set -- $(echo "$1" | tr ':' ' ')
    blk_bench "/dev/$(arg viommu.blk_dev vda)" "$1" "$2" "$3" $BENCH_N || \
        fail blkbench "bs=$1 $3: blk_bench exited with $?"
}

wl_unplug() {
    # ask the host to device_del the hot-plugged endpoint(s); wait until they are gone
    busy=$(arg viommu.unplug_busy 0)
    limit=$(arg viommu.hotplug_timeout 60)
    dev=$(arg viommu.blk_dev vda)
    if [ "$busy" = 1 ]; then  # a hot-plugged disk may still be probing: wait for it
        t=0
        while [ ! -b "/dev/$dev" ] && [ $t -lt $((limit * 10)) ]; do sleep 0.1; t=$((t + 1)); done
    fi
    bdf=$(blk_pci_bdf "$dev")
    if [ -z "$bdf" ]; then
        for d in /sys/bus/pci/devices/*; do
            case "${d##*/}" in 0000:00:*) ;; *) bdf=${d##*/} ;; esac
        done
    fi
    [ -n "$bdf" ] || { fail unplug "no endpoint to unplug"; return; }
    pid=""
    if [ "$busy" = 1 ] && [ -b "/dev/$dev" ]; then
        ( i=0; while [ -b "/dev/$dev" ]; do
              dd if=/dev/urandom of="/dev/$dev" bs=65536 count=16 seek=$((i % 64)) oflag=direct conv=notrunc 2>/dev/null || break
              dd if="/dev/$dev" of=/dev/null bs=65536 count=16 iflag=direct 2>/dev/null || break
              i=$((i + 1)); echo $i > /tmp/unplug.iter
          done ) &
        pid=$!
        t=0
        while [ ! -s /tmp/unplug.iter ] && [ $t -lt 100 ]; do sleep 0.1; t=$((t + 1)); done
    fi
    t0=$(now_ms)
    mark wait-unplug "{\"bdf\":\"$bdf\",\"busy\":$([ -n "$pid" ] && echo true || echo false)}"
    t=0
    while [ -e "/sys/bus/pci/devices/$bdf" ]; do
        [ $t -ge $((limit * 10)) ] && { fail unplug "$bdf still present after $limit s"; break; }
        sleep 0.1
        t=$((t + 1))
    done
    t1=$(now_ms)
    iters=0
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        iters=$(cat /tmp/unplug.iter 2>/dev/null || echo 0)
    fi
    blkgone=true
    [ -b "/dev/$dev" ] && blkgone=false
    mark unplug "{\"bdf\":\"$bdf\",\"ms\":$((t1 - t0)),\"busy_iterations\":$iters,\"blk_gone\":$blkgone,\"devices\":$(ls /sys/bus/pci/devices | wc -l)}"
}

wl_io() { # [BYTES[:read|:write]]
    dev=$(arg viommu.blk_dev vda)
    len=${1%%:*}
    len=${len:-65536}
    op=both
    case "$1" in *:read) op=read ;; *:write) op=write ;; esac
    bs=4096
    wait_blk "$dev" || { mark io "{\"dev\":\"$dev\",\"bytes\":$len,\"write_ok\":false,\"read_ok\":false,\"match\":false,\"error\":\"no /dev/$dev after 30 s\"}"; return; }
    n=$(( (len + bs - 1) / bs ))
    wok=true; rok=true; err=""
    t0=$(now_ms)
    if [ $op = read ]; then  # compare with what the last io wrote (no other device access)
        head -c $((n * bs)) /tmp/io.last > /tmp/io.src 2>/dev/null
    else
        head -c $((n * bs)) /dev/urandom > /tmp/io.src
        dd if=/tmp/io.src of="/dev/$dev" bs=$bs count=$n oflag=direct conv=notrunc 2>/tmp/io.err || \
            { wok=false; err="write: $(tail -n 2 /tmp/io.err | tr '\n"\\' '  _')"; }
    fi
    want=$(md5sum < /tmp/io.src | cut -d' ' -f1)
    t1=$(now_ms)
    if [ $op = write ]; then  # no read back: none of the disk's DMA buffers is mapped after it
        rok=null; match=null
    else
        dd if="/dev/$dev" of=/tmp/io.dst bs=$bs count=$n iflag=direct 2>/tmp/io.err || \
            { rok=false; err="$err read: $(tail -n 2 /tmp/io.err | tr '\n"\\' '  _')"; }
        got=$(md5sum < /tmp/io.dst | cut -d' ' -f1)
        match=false
        [ "$want" = "$got" ] && match=true
    fi
    t2=$(now_ms)
    mark io "{\"dev\":\"$dev\",\"op\":\"$op\",\"bytes\":$((n * bs)),\"write_ok\":$wok,\"read_ok\":$rok,\"match\":$match,\"write_ms\":$((t1 - t0)),\"read_ms\":$((t2 - t1)),\"error\":\"$err\"}"
    [ $op = read ] || mv /tmp/io.src /tmp/io.last
    rm -f /tmp/io.src /tmp/io.dst
}

# Workload `soak:SECONDS`: every virtio-blk disk (vd*) and the DMA engine (/dev/viommu-dma)
# busy at once for SECONDS: per disk, seeded-random 64 KiB writes at rotating offsets, each
# read back with O_DIRECT and compared byte for byte (cmp); the engine, viommu_dma_test
# dma-api in a loop (its driver compares every copy).  A failed write / read is retried
# once (an injected fault may fail one request) and counted; a mismatch never is.
# Marks `soak-start`, `soak-progress` every viommu.soak_every s (default 10) and `soak`.
soak_disk() { # DEV END_MS: loop until END_MS, counters in /tmp/soak.DEV
    req=0; bytes=0; checks=0; bad=0; retries=0; errs=0; i=0
    while [ "$(now_ms)" -lt "$2" ]; do
        off=$(( (i * 7) % 256 ))
        head -c 65536 /dev/urandom > "/tmp/soak.$1.src"
        ok=false
        for try in 1 2; do
            if dd if="/tmp/soak.$1.src" of="/dev/$1" bs=65536 count=1 seek=$off oflag=direct conv=notrunc 2>/dev/null &&
               dd if="/dev/$1" of="/tmp/soak.$1.dst" bs=65536 count=1 skip=$off iflag=direct 2>/dev/null; then
                ok=true; break
            fi
            retries=$((retries + 1))
        done
        req=$((req + 2)); i=$((i + 1))
        if $ok; then
            bytes=$((bytes + 131072))
            if cmp -s "/tmp/soak.$1.src" "/tmp/soak.$1.dst"; then checks=$((checks + 1)); else bad=$((bad + 1)); fi
        else
            errs=$((errs + 1))
        fi
        echo "{\"requests\":$req,\"bytes\":$bytes,\"checks\":$checks,\"mismatches\":$bad,\"retries\":$retries,\"errors\":$errs}" > "/tmp/soak.$1.tmp"
        mv "/tmp/soak.$1.tmp" "/tmp/soak.$1"
    done
}

soak_engine() { # END_MS: viommu_dma_test dma-api in a loop, counters in /tmp/soak.dma
    runs=0; bytes=0; checks=0; bad=0
    while [ "$(now_ms)" -lt "$1" ]; do
        if viommu_dma_test dma-api > /tmp/soak.dma.out 2>&1; then
            checks=$((checks + 1))
            bytes=$((bytes + $(grep -o '"len":[0-9]*' /tmp/soak.dma.out | awk -F: '{s += $2} END {print s + 0}')))
        else
            bad=$((bad + 1)); cat /tmp/soak.dma.out
        fi
        runs=$((runs + 1))
        echo "{\"requests\":$runs,\"bytes\":$bytes,\"checks\":$checks,\"mismatches\":$bad,\"retries\":0,\"errors\":0}" > /tmp/soak.dma.tmp
        mv /tmp/soak.dma.tmp /tmp/soak.dma
    done
}

soak_state() { # JSON of every endpoint's counters
    out=""
    for f in /tmp/soak.vd? /tmp/soak.dma; do
        [ -e "$f" ] && out="$out${out:+,}\"${f#/tmp/soak.}\":$(cat "$f")"
    done
    echo "{$out}"
}

wl_soak() { # SECONDS
    secs=${1:-60}
    every=$(arg viommu.soak_every 10)
    end=$(( $(now_ms) + secs * 1000 ))
    rm -f /tmp/soak.*
    pids=""
    disks=""
    for d in /sys/block/vd*; do
        [ -e "$d" ] || continue
        disks="$disks ${d##*/}"
        soak_disk "${d##*/}" $end & pids="$pids $!"
    done
    engine=false
    if [ -e /dev/viommu-dma ] && [ -x /bin/viommu_dma_test ]; then
        engine=true; soak_engine $end & pids="$pids $!"
    fi
    mark soak-start "{\"seconds\":$secs,\"disks\":\"$(echo $disks)\",\"engine\":$engine}"
    t0=$(now_ms)
    while [ "$(now_ms)" -lt "$end" ]; do
        sleep "$every"
        mark soak-progress "{\"ms\":$(( $(now_ms) - t0 )),\"endpoints\":$(soak_state)}"
        kmsg_dump
    done
    for p in $pids; do wait "$p"; done
    mark soak "{\"ms\":$(( $(now_ms) - t0 )),\"endpoints\":$(soak_state)}"
    grep -q "\"mismatches\":[1-9]" /tmp/soak.vd? /tmp/soak.dma 2>/dev/null && fail soak "data mismatch"
}

wl_dmatest() { # CHECK: viommu_dma_test CHECK through /dev/viommu-dma (the DMA engine's driver)
    t=0
    while [ ! -e /dev/viommu-dma ]; do
        [ $t -ge 300 ] && { fail "$1" "no /dev/viommu-dma after 30 s (is the engine bound to viommu_dma?)"; return; }
        sleep 0.1
        t=$((t + 1))
    done
    [ -x /bin/viommu_dma_test ] || { fail "$1" "no viommu_dma_test (it comes with kernels built from source)"; return; }
    viommu_dma_test "$1" || fail "$1" "viommu_dma_test exited with $?"
}

wl_host() { # [seconds to wait for each answer; 0 = forever]
    hlimit=${1:-$(arg viommu.host_timeout 120)}
    stty -echo 2>/dev/null
    hn=0
    while true; do
        mark wait-host "{\"n\":$hn}"
        hline=""
        if [ "$hlimit" = 0 ]; then
            until read -r hline; do sleep 1; done
        else
            read -r -t "$hlimit" hline || { fail host "no answer from the host within $hlimit s"; return; }
        fi
        [ "$hline" = end ] && return
        for hw in $hline; do run_workload "$hw"; done
        kmsg_dump
        mark host-step "{\"n\":$hn,\"ran\":\"$(echo "$hline" | tr -d '"\\')\"}"
        hn=$((hn + 1))
    done
}

wl_busmaster() { # BDF: set Memory Space + Bus Master Enable of a function no driver owns
    # (the host drives its DMA: e.g. the DMA engine under viommu-dma)
    bdf=$1
    cfg=/sys/bus/pci/devices/$bdf/config
    [ -e "$cfg" ] || { fail busmaster "no PCI function $bdf"; return; }
    printf '\006' | dd of="$cfg" bs=1 seek=4 count=1 conv=notrunc 2>/dev/null || \
        { fail busmaster "cannot write the command register of $bdf"; return; }
    mark busmaster "{\"bdf\":\"$bdf\",\"command\":\"0x$(od -A n -t x2 -j 4 -N 2 "$cfg" | tr -d ' ')\"}"
}

wl_shell() {
    mark shell '{}'
    setsid cttyhack sh
}

# Workloads `iommufd` and `type1`: the DMA test engines (PCI 5555:0001) bound to vfio-pci
# and driven from user space by a program built from guest_images/programs/:
# /bin/iommufd_test (/dev/iommu and the VFIO cdev; one `iommufd-<check>` marker per check)
# or /bin/vfio_type1_test (the VFIO container and group files; `type1-<check>` markers).
#     viommu.iommufd_checks=ioas,replace,...   viommu.type1_checks=map,remap,...
#     viommu.iommufd_unsafe=1   (also run steps the kernel source says crash the kernel)
vfio_bind() { # bdf: bind it to vfio-pci (driver_override); prints the driver it ends with
    d=/sys/bus/pci/devices/$1
    [ -e "$d/driver" ] && echo "$1" > "$d/driver/unbind"
    echo vfio-pci > "$d/driver_override"
    echo "$1" > /sys/bus/pci/drivers_probe 2>/dev/null
    [ -e "$d/driver" ] && basename "$(readlink "$d/driver")"
}

vfio_engines() { # sets $engines (BDFs) and $engines_json; marks each engine; 1 if none
    engines=""; engines_json=""
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = 0x5555 ] && [ "$(cat "$d/device")" = 0x0001 ] && engines="$engines ${d##*/}"
    done
    [ -n "$engines" ] || return 1
    for bdf in $engines; do
        drv=$(vfio_bind "$bdf")
        grp=$(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu_group" 2>/dev/null)" 2>/dev/null)
        cdev=$(ls "/sys/bus/pci/devices/$bdf/vfio-dev" 2>/dev/null | head -1)
        mark vfio-engine "{\"bdf\":\"$bdf\",\"driver\":\"$drv\",\"iommu_group\":\"$grp\",\"cdev\":\"$cdev\"}"
        engines_json="$engines_json${engines_json:+,}\"$bdf\""
    done
}

run_vfio_program() { # workload program checks-parameter [extra args]
    w=$1; prog=/bin/$2; checks=$(arg "$3" ""); shift 3
    [ -x "$prog" ] || { fail "$w" "no $prog (guest_images/programs)"; return; }
    vfio_engines || { fail "$w" "no DMA test engine (5555:0001) on the PCI bus"; return; }
    "$prog" ${checks:+--checks "$checks"} "$@" $engines
    rc=$?
    mark "$w" "{\"engines\":[$engines_json],\"rc\":$rc}"
    [ $rc = 0 ] || fail "$w" "${prog##*/} exited with $rc"
}

wl_iommufd() {
    unsafe=""
    [ "$(arg viommu.iommufd_unsafe 0)" = 1 ] && unsafe=--unsafe
    run_vfio_program iommufd iommufd_test viommu.iommufd_checks $unsafe
}

# Workload `vfio-selftests`: the kernel's own VFIO selftests (tools/testing/selftests/vfio
# of the built kernel, with the project's driver for the engine: guest_images/vfio_selftests/,
# installed in /bin/vfio-selftests/) against the first DMA test engine, bound to vfio-pci.
# Each program's output (KTAP) is passed on line by line as it comes (the host's receipt
# times give each test's duration), `ktap {"test":NAME,"line":TEXT}`, then
# `vfio-selftest {"test":NAME,"rc":RC}`; the host parses the results
# (viommu_backend/guest/ktap.py).  Exit codes 0 and 4 (KSFT_SKIP: nothing to test here)
# are not errors: the host shows which tests ran and why the others skipped.
#     viommu.vfio_selftests=vfio_pci_driver_test,...   (default: all of them)
TAB=$(printf '\t'); CR=$(printf '\r')
ktap_lines() { # name: its standard input's lines as ktap markers, each as it comes
    while IFS= read -r line; do
        case "$line" in *[\\\"$TAB$CR]*)
            line=$(printf '%s\n' "$line" | sed 's/\\/\\\\/g; s/"/\\"/g; s/\t/ /g; s/\r//g') ;;
        esac
        mark ktap "{\"test\":\"$1\",\"line\":\"$line\"}"
    done
}

wl_vfio_selftests() {
    dir=/bin/vfio-selftests
    tests=$(arg viommu.vfio_selftests "" | tr ',' ' ')
    [ -n "$tests" ] || tests=$(ls "$dir" 2>/dev/null)
    [ -n "$tests" ] || { fail vfio-selftests "no $dir (the kernel tree has no VFIO selftests)"; return; }
    vfio_engines || { fail vfio-selftests "no DMA test engine (5555:0001) on the PCI bus"; return; }
    set -- $engines
    for t in $tests; do
        [ -x "$dir/$t" ] || { fail vfio-selftests "no $dir/$t"; continue; }
        { "$dir/$t" "$1" 2>&1; echo $? > /tmp/ktap.rc; } | ktap_lines "$t"
        rc=$(cat /tmp/ktap.rc)
        mark vfio-selftest "{\"test\":\"$t\",\"bdf\":\"$1\",\"rc\":$rc}"
        case $rc in 0|4) ;; *) fail vfio-selftests "$t exited with $rc (KSFT_FAIL or worse)" ;; esac
    done
}

run_workload() { # name[:arg]
    w=${1%%:*}
    warg=""
    case "$1" in *:*) warg=${1#*:} ;; esac
    mark workload "{\"name\":\"$w\"}"
    case "$w" in
        enumerate) wl_enumerate ;;
        mmio) wl_mmio ;;
        smmu) wl_smmu ;;
        hotplug) wl_hotplug ;;
        blk) wl_blk $warg ;;
        blkbench) wl_blkbench $warg ;;
        unplug) wl_unplug ;;
        shell) wl_shell ;;
        io) wl_io $warg ;;
        host) wl_host $warg ;;
        busmaster) wl_busmaster $warg ;;
        soak) wl_soak $warg ;;
        dma-api|pasid|sva|httu) wl_dmatest "$w" ;;
        iommufd) wl_iommufd ;;
        type1) run_vfio_program type1 vfio_type1_test viommu.type1_checks ;;
        vfio-selftests) wl_vfio_selftests ;;
        none) ;;
        *) fail "$w" "unknown workload" ;;
    esac
}

for w in $(arg viommu.workload enumerate | tr ',' ' '); do
    run_workload "$w"
    kmsg_dump
done

mark done "{\"errors\":$ERRORS}"
if [ "$(arg viommu.keep 0)" = 1 ]; then
    mark idle '{}'
    wl_host 0
    while true; do sleep 3600; done
fi
# The host reads the backend's final state before the shutdown turns the SMMU off, then
# types `poweroff`; without an answer, power off anyway after viommu.done_wait seconds.
stty -echo 2>/dev/null
read -r -t "$(arg viommu.done_wait 10)" _ack || true
poweroff -f
