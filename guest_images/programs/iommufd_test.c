/*
 * iommufd_test: the guest kernel's iommufd and VFIO uAPI driven against the emulated
 * SMMUv3, with the backend's DMA test engine (PCI 5555:0001, "testdev") as the device
 * assigned to user space.
 *
 *     iommufd_test [--checks LIST] [--unsafe] BDF [BDF2]
 *
 * BDF is an engine bound to vfio-pci (opened through /dev/vfio/devices/vfioN and
 * /dev/iommu; BAR0 mmapped through the VFIO region); BDF2 a second engine in the same
 * iommu group (check "group").  LIST: comma-separated check names (default: all that
 * apply); --unsafe also runs steps that the kernel source says crash the kernel (each such
 * step names the bug).  Each check prints one line on stdout, the guest init's marker format:
 *
 *     VIOMMU-MARK: iommufd-<check> {"ok":true,"steps":[...],...}
 *
 * Every step records what it did and whether that is what the kernel source says it
 * should do; a refusal records the errno, the errno expected and where the kernel decides
 * it ("as_source").  DMA steps run the engine's copy (DMA_SRC -> DMA_DST through the
 * SMMU) and compare the bytes.  The engine's registers (endpoints/testdev.py):
 * MAGIC 0x00, DMA_SRC 0x18, DMA_DST 0x20, DMA_LEN 0x28, DMA_CTRL 0x2C (GO bit 0),
 * DMA_STATUS 0x30 (BUSY 0, DONE 1, ERROR 2, ERR_CODE 15:8, EVENT 23:16), DMA_COUNT 0x34.
 * The engine's interrupt is never enabled: the program polls DMA_STATUS.
 *
 * Exit status: 0 when every check ran as expected, 1 otherwise, 2 on bad usage.
 */
#include "vfio_engine.h"

/* IOVAs: above the arm-smmu-v3 SW_MSI window (MSI_IOVA_BASE 0x8000000, 1 MiB) */
#define IOVA_SRC 0x40000000ULL
#define IOVA_DST 0x40100000ULL
#define IOVA_SRC2 0x40200000ULL
#define MSI_IOVA 0x8000000ULL
#define LEN (64 * 1024)

/* --- check "ioas": IOAS map / copy / unmap, HWPT_PAGING, attach, DMA, the hole, re-map -- */
static void ioas_hole(struct ctx *c, struct report *r, struct engine *e, int ifd, uint32_t ioas,
		      uint8_t *src, uint8_t *dst)
{
	struct smmu_event ev;
	int rc;

	if (rep_call(r, "IOMMU_IOAS_UNMAP dst", ioas_unmap(ifd, ioas, IOVA_DST, LEN)) < 0)
		return;
	memset(dst, 0xA5, LEN);
	rep_dma_refused(r, "DMA into the unmapped hole", e, IOVA_SRC, IOVA_DST, dst, 0xA5, LEN,
			EVT_F_TRANSLATION);
	rc = kmsg_find_event(c, EVT_F_TRANSLATION, e->sid, IOVA_DST, 5000, &ev);
	rep_step(r, "driver reports the event", rc == 0,
		 "\"event\":%u,\"sid\":%u,\"addr\":\"0x%llx\",\"source\":\"arm-smmu-v3.c arm_smmu_evtq_thread: "
		 "events not handed to an iopf handler are logged\"",
		 rc ? 0 : ev.id, rc ? 0 : ev.sid, rc ? 0ULL : (unsigned long long)ev.words[2]);
	if (rep_call(r, "IOMMU_IOAS_MAP dst again", ioas_map(ifd, ioas, IOVA_DST, dst, LEN)) < 0)
		return;
	memset(dst, 0, LEN);
	rep_dma_ok(r, "DMA after re-map", e, IOVA_SRC, IOVA_DST, src, dst, LEN);
}

static void ioas_copy_dma(struct report *r, struct engine *e, int ifd, uint32_t ioas, uint8_t *src,
			  uint8_t *dst)
{
	uint32_t ioas2 = 0;

	if (rep_call(r, "IOMMU_IOAS_COPY src -> SRC2", ioas_copy(ifd, ioas, ioas, IOVA_SRC, IOVA_SRC2, LEN)) < 0)
		return;
	fill_pattern(src, LEN, 2);
	memset(dst, 0, LEN);
	rep_dma_ok(r, "DMA from the copied IOVA", e, IOVA_SRC2, IOVA_DST, src, dst, LEN);
	if (rep_call(r, "IOMMU_IOAS_ALLOC second", ioas_alloc(ifd, &ioas2)) < 0)
		return;
	rep_call(r, "IOMMU_IOAS_COPY into the second IOAS", ioas_copy(ifd, ioas2, ioas, IOVA_SRC, IOVA_SRC, LEN));
	rep_refusal(r, "IOMMU_IOAS_COPY from an unmapped IOVA",
		    ioas_copy(ifd, ioas2, ioas, IOVA_SRC + 8 * LEN, IOVA_DST, LEN), ENOENT,
		    "iommufd/ioas.c iommufd_ioas_copy: iopt_get_pages finds no area");
	rep_call(r, "IOMMU_DESTROY second IOAS", obj_destroy(ifd, ioas2));
}

static int check_ioas(struct ctx *c, struct report *r)
{
	uint8_t *src = buf_alloc(LEN), *dst = buf_alloc(LEN);
	uint32_t ioas = 0, hwpt = 0;
	struct engine e;
	int ifd;

	if (engine_open_iommufd(r, c->bdf, &e, &ifd))
		goto out;
	if (rep_call(r, "IOMMU_IOAS_ALLOC", ioas_alloc(ifd, &ioas)) < 0)
		goto out;
	fill_pattern(src, LEN, 1);
	if (rep_call(r, "IOMMU_IOAS_MAP src", ioas_map(ifd, ioas, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP dst", ioas_map(ifd, ioas, IOVA_DST, dst, LEN)) < 0)
		goto out;
	rep_refusal(r, "IOMMU_IOAS_MAP over a mapping", ioas_map(ifd, ioas, IOVA_DST, src, PAGE), EEXIST,
		    "iommufd/io_pagetable.c iopt_check_iova: an area already maps the range");
	if (rep_call(r, "IOMMU_HWPT_ALLOC", hwpt_alloc(ifd, e.devid, ioas, 0, 0, &hwpt)) < 0 ||
	    rep_call(r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", vfio_attach(&e, hwpt)) < 0)
		goto out;
	rep_refusal(r, "IOMMU_IOAS_MAP in the SW_MSI window", ioas_map(ifd, ioas, MSI_IOVA, src, PAGE), EINVAL,
		    "arm-smmu-v3 reserves MSI_IOVA_BASE (IOMMU_RESV_SW_MSI) for an attached device; "
		    "io_pagetable.c iopt_check_iova refuses reserved IOVA");
	rep_refusal(r, "IOMMU_DESTROY the IOAS under an HWPT", obj_destroy(ifd, ioas), EBUSY,
		    "iommufd/main.c iommufd_object_remove: the HWPT holds a user reference");
	rep_dma_ok(r, "DMA src -> dst", &e, IOVA_SRC, IOVA_DST, src, dst, LEN);
	ioas_copy_dma(r, &e, ifd, ioas, src, dst);
	ioas_hole(c, r, &e, ifd, ioas, src, dst);
	rep_call(r, "VFIO_DEVICE_DETACH_IOMMUFD_PT", vfio_detach(&e));
	rep_call(r, "IOMMU_DESTROY hwpt", obj_destroy(ifd, hwpt));
	rep_call(r, "IOMMU_DESTROY ioas", obj_destroy(ifd, ioas));
out:
	engine_close(&e, ifd);
	return r->ok;
}

/* --- check "replace": HWPT A -> B while the engine copies; detach blocks the device ---- */
struct copier {
	struct engine *e;
	volatile int stop;
	volatile int phase;  /* 0 before the replace, 1 while it runs, 2 after it returned */
	int done[3], failed[3], timeouts;
	unsigned fail_events[3]; /* per phase: a bit per distinct event code (0..31) of failed copies */
};

static void *copier_run(void *arg)
{
	struct copier *k = arg;

	while (!k->stop) {
		int start = k->phase, phase;
		uint32_t st;

		__sync_synchronize();
		st = engine_copy(k->e, IOVA_SRC, IOVA_DST, LEN);
		/* "before": started and ended before the replace began; "after": started once it
		 * had returned; anything else overlapped it */
		phase = start == 2 ? 2 : k->phase == 0 ? 0 : 1;
		if (st == ST_TIMEOUT)
			k->timeouts++;
		else if (st & ST_DONE)
			k->done[phase]++;
		else {
			k->failed[phase]++;
			k->fail_events[phase] |= 1u << (ST_EVENT(st) & 31);
		}
	}
	return NULL;
}

static int wait_copies(struct copier *k, int phase, int n, int timeout_ms)
{
	double end = now_s() + timeout_ms / 1000.0;

	while (k->done[phase] + k->failed[phase] < n && now_s() < end)
		sleep_us(1000);
	return k->done[phase] + k->failed[phase] >= n ? 0 : -ETIMEDOUT;
}

/* attach A, copy continuously, replace with B, then prove nothing lands in A any more */
static void replace_running(struct report *r, struct engine *e, uint32_t hwpt_b, uint8_t *dst_a,
			    uint8_t *src_b, uint8_t *dst_b)
{
	struct copier k = { .e = e };
	pthread_t t;
	double t0;
	int rc, untouched, b_ok;

	pthread_create(&t, NULL, copier_run, &k);
	rc = wait_copies(&k, 0, 3, 10000);
	k.phase = 1;
	__sync_synchronize();
	t0 = now_s();
	rc = rc ? rc : vfio_attach(e, hwpt_b);
	rep_step(r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT B (replace, engine running)", rc >= 0,
		 "\"errno\":%d,\"ms\":%.2f", rc < 0 ? -rc : 0, (now_s() - t0) * 1e3);
	memset(dst_a, 0xEE, LEN); /* sentinel: a DMA into A after this point overwrites it */
	__sync_synchronize();
	k.phase = 2;
	wait_copies(&k, 2, 4, 10000);
	k.stop = 1;
	pthread_join(t, NULL);
	untouched = all_bytes(dst_a, LEN, 0xEE);
	b_ok = !memcmp(src_b, dst_b, LEN);
	rep_step(r, "no DMA into A after the replace returned", untouched && k.failed[0] == 0 && k.failed[2] == 0 &&
		 k.done[2] >= 4 && b_ok && !k.timeouts,
		 "\"copies_before\":%d,\"failed_before\":%d,\"copies_during\":%d,\"failed_during\":%d,"
		 "\"copies_after\":%d,\"failed_after\":%d,\"timeouts\":%d,\"a_untouched\":%s,\"b_data_ok\":%s",
		 k.done[0], k.failed[0], k.done[1], k.failed[1], k.done[2], k.failed[2], k.timeouts,
		 untouched ? "true" : "false", b_ok ? "true" : "false");
	/* arm_smmu_write_cd_entry: A and B differ in ASID (CD word 0) and TTB0 (word 1), so
	 * the update is not hitless: the CD is made invalid (V=0), synced, rewritten.  A copy
	 * in that window is terminated with C_BAD_CD; nothing else may fail it. */
	rep_step(r, "copies failed during the replace only by C_BAD_CD", (k.fail_events[1] & ~(1u << 0x0a)) == 0,
		 "\"events_mask\":\"0x%x\",\"source\":\"arm-smmu-v3.c arm_smmu_write_entry: more than one "
		 "used qword changes -> V=0 first (not hitless)\"", k.fail_events[1]);
}

static int replace_map(struct report *r, int ifd, uint32_t ioas, uint8_t *src, uint8_t *dst)
{
	if (rep_call(r, "IOMMU_IOAS_MAP src", ioas_map(ifd, ioas, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP dst", ioas_map(ifd, ioas, IOVA_DST, dst, LEN)) < 0)
		return -1;
	return 0;
}

static int check_replace(struct ctx *c, struct report *r)
{
	uint8_t *src_a = buf_alloc(LEN), *dst_a = buf_alloc(LEN), *src_b = buf_alloc(LEN), *dst_b = buf_alloc(LEN);
	uint32_t ioas_a = 0, ioas_b = 0, hwpt_a = 0, hwpt_b = 0;
	struct engine e;
	int ifd;

	if (engine_open_iommufd(r, c->bdf, &e, &ifd))
		goto out;
	fill_pattern(src_a, LEN, 10);
	fill_pattern(src_b, LEN, 11);
	if (rep_call(r, "IOMMU_IOAS_ALLOC A", ioas_alloc(ifd, &ioas_a)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_ALLOC B", ioas_alloc(ifd, &ioas_b)) < 0 ||
	    replace_map(r, ifd, ioas_a, src_a, dst_a) || replace_map(r, ifd, ioas_b, src_b, dst_b) ||
	    rep_call(r, "IOMMU_HWPT_ALLOC A", hwpt_alloc(ifd, e.devid, ioas_a, 0, 0, &hwpt_a)) < 0 ||
	    rep_call(r, "IOMMU_HWPT_ALLOC B", hwpt_alloc(ifd, e.devid, ioas_b, 0, 0, &hwpt_b)) < 0 ||
	    rep_call(r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT A", vfio_attach(&e, hwpt_a)) < 0)
		goto out;
	rep_dma_ok(r, "DMA through A", &e, IOVA_SRC, IOVA_DST, src_a, dst_a, LEN);
	rep_refusal(r, "IOMMU_DESTROY A while attached", obj_destroy(ifd, hwpt_a), EBUSY,
		    "iommufd/main.c iommufd_object_remove: the attached device holds a reference");
	replace_running(r, &e, hwpt_b, dst_a, src_b, dst_b);
	rep_call(r, "IOMMU_DESTROY A after the replace", obj_destroy(ifd, hwpt_a));
	if (rep_call(r, "VFIO_DEVICE_DETACH_IOMMUFD_PT", vfio_detach(&e)) < 0)
		goto out;
	memset(dst_b, 0x5A, LEN);
	rep_dma_refused(r, "DMA after detach (blocked)", &e, IOVA_SRC, IOVA_DST, dst_b, 0x5A, LEN, EVT_ABORT);
	rep_call(r, "IOMMU_DESTROY B", obj_destroy(ifd, hwpt_b));
	rep_call(r, "IOMMU_DESTROY IOAS A", obj_destroy(ifd, ioas_a));
	rep_call(r, "IOMMU_DESTROY IOAS B", obj_destroy(ifd, ioas_b));
out:
	engine_close(&e, ifd);
	return r->ok;
}

/* --- check "coherency": cache coherency as the kernel decides it ------------------------- */
static int cc_iommu(int ifd, uint32_t ioas)
{
	struct iommu_vfio_ioas v = { .size = sizeof(v), .ioas_id = ioas, .op = IOMMU_VFIO_IOAS_SET };

	if (ioctl(ifd, IOMMU_VFIO_IOAS, &v))
		return -errno;
	return ioctl_rc(ifd, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU);
}

static void coherency_refused(struct ctx *c, struct report *r)
{
	char drv[256];
	int fd = cdev_open(c->bdf);

	snprintf(drv, sizeof(drv), "/sys/bus/pci/devices/%s/driver", c->bdf);
	rep_step(r, "vfio-pci refuses a non-coherent IOMMU", fd < 0 && access(drv, F_OK) != 0,
		 "\"cdev\":%s,\"driver_bound\":%s,\"source\":\"vfio_main.c __vfio_register_dev: "
		 "!IOMMU_CAP_CACHE_COHERENCY -> EINVAL (arm-smmu-v3 reports ARM_SMMU_FEAT_COHERENCY, "
		 "from the DT dma-coherent property)\"",
		 fd >= 0 ? "true" : "false", access(drv, F_OK) == 0 ? "true" : "false");
	if (fd >= 0)
		close(fd);
}

static void coherency_hw_info(struct ctx *c, struct report *r, int ifd, uint32_t devid)
{
	struct smmu_hw_info_v3 data = { 0 };
	struct iommu_hw_info h = { .size = sizeof(h), .dev_id = devid, .data_len = sizeof(data),
				   .data_uptr = (uintptr_t)&data };
	int rc = ioctl(ifd, IOMMU_GET_HW_INFO, &h) ? -errno : 0;
	int want_dirty = c->dt_coherent && IDR0_HTTU(c->idr0) == 2;
	int dirty = !!(h.out_capabilities & IOMMU_HW_CAP_DIRTY_TRACKING);
	/* 6.12 arm-smmu-v3 has no hw_info op: type NONE (0).  7.x has one (type ARM_SMMUV3,
	 * 2, the SMMU's IDR0-5 read as they are) when built with ARM_SMMU_V3_IOMMUFD, else NONE */
	int type_ok = h.out_data_type == 0 ? 1 : c->major >= 7 && h.out_data_type == 2 && data.idr[0] == c->idr0;

	rep_step(r, "IOMMU_GET_HW_INFO", rc == 0 && type_ok && dirty == want_dirty,
		 "\"errno\":%d,\"type\":%u,\"dirty_tracking\":%s,\"expect_dirty\":%s,\"kernel_idr0\":\"0x%x\","
		 "\"source\":\"arm_smmu_capable: IOMMU_CAP_DIRTY_TRACKING = FEAT_HD (IDR0.HTTU=2) && FEAT_COHERENCY; "
		 "hw_info (ARM_SMMUV3 type) only in 7.x arm-smmu-v3-iommufd.c\"",
		 -rc, h.out_data_type, dirty ? "true" : "false", want_dirty ? "true" : "false",
		 h.out_data_type == 2 ? data.idr[0] : 0);
}

static int check_coherency(struct ctx *c, struct report *r)
{
	int warned = kmsg_grep("IDR0.COHACC overridden by FW configuration");
	int want_warn = IDR0_COHACC(c->idr0) != c->dt_coherent;
	uint32_t ioas = 0, hwpt = 0;
	struct engine e = { .fd = -1 };
	int ifd = -1, before, after;

	rep_field(r, "\"idr0_cohacc\":%d,\"dt_coherent\":%d", IDR0_COHACC(c->idr0), c->dt_coherent);
	rep_step(r, "COHACC override warning", warned == want_warn,
		 "\"warned\":%s,\"expect\":%s,\"source\":\"arm_smmu_device_hw_probe: a DT/IORT coherency that "
		 "differs from IDR0.COHACC wins, with a warning\"",
		 warned ? "true" : "false", want_warn ? "true" : "false");
	if (!c->dt_coherent) {
		coherency_refused(c, r);
		return r->ok;
	}
	if (engine_open_iommufd(r, c->bdf, &e, &ifd))
		goto out;
	rep_step(r, "IOMMU_CAP_CACHE_COHERENCY", 1, "\"value\":true,\"source\":\"iommufd/device.c "
		 "iommufd_device_bind refuses (EINVAL) a device without it: the bind succeeded\"");
	coherency_hw_info(c, r, ifd, e.devid);
	if (rep_call(r, "IOMMU_IOAS_ALLOC", ioas_alloc(ifd, &ioas)) < 0)
		goto out;
	before = cc_iommu(ifd, ioas);
	rep_step(r, "VFIO_DMA_CC_IOMMU, no HWPT yet", before == 1,
		 "\"value\":%d,\"source\":\"vfio_compat.c iommufd_vfio_cc_iommu: every HWPT of the compat IOAS "
		 "enforces (vacuously true)\"", before);
	if (rep_call(r, "IOMMU_HWPT_ALLOC", hwpt_alloc(ifd, e.devid, ioas, 0, 0, &hwpt)) < 0 ||
	    rep_call(r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", vfio_attach(&e, hwpt)) < 0)
		goto out;
	after = cc_iommu(ifd, ioas);
	rep_step(r, "enforce_cache_coherency of the HWPT", after == 0,
		 "\"cc_iommu\":%d,\"expect\":0,\"source\":\"%s\"", after,
		 c->major >= 7 ? "arm_smmu_capable: IOMMU_CAP_ENFORCE_CACHE_COHERENCY = master CANWBS (ACPI IORT "
				 "memory access flags only; none from DT) -> iommufd_hwpt_paging_alloc never asks "
				 "enforce_cache_coherency"
			       : "6.12 arm_smmu_capable has no IOMMU_CAP_ENFORCE_CACHE_COHERENCY case and its domain "
				 "ops no enforce_cache_coherency: the HWPT never enforces");
	rep_call(r, "VFIO_DEVICE_DETACH_IOMMUFD_PT", vfio_detach(&e));
	rep_call(r, "IOMMU_DESTROY hwpt", obj_destroy(ifd, hwpt));
	rep_call(r, "IOMMU_DESTROY ioas", obj_destroy(ifd, ioas));
out:
	engine_close(&e, ifd);
	return r->ok;
}

/* --- check "fault": fault-capable HWPTs, I/O page faults through a fault queue --------- */
#define FAULT_IOVA 0x40400000ULL /* a page the engine writes before it is mapped */

struct fault_env {
	struct engine e;
	int ifd, ffd;
	uint32_t ioas, fault_id, hwpt_f, hwpt_plain;
	uint8_t *src, *dst;
	int delivers; /* the kernel hands stall faults to iommufd (per its source) */
};

/* what the kernel source says a stall fault on a fault-capable HWPT does (7.x) */
static const char *fault_path(int forced, int *delivers)
{
	*delivers = forced;
	if (!forced)
		return "7.x arm_smmu_enable_iopf: a master without stalls needs no IOPF (attach succeeds); "
		       "its faults are plain events that terminate the transaction";
	return "7.x arm_smmu_enable_iopf adds the stall master to the IOPF queue; iommufd_fault_iopf_handler "
	       "queues the group for the fault fd; the response becomes CMD_RESUME";
}

/* start a one-page copy into an unmapped page; with delivery, read the fault record */
static int fault_raise(struct report *r, struct fault_env *f, const char *what, struct iommu_hwpt_pgfault *pf)
{
	char s[200];
	uint32_t st;
	int rc;

	engine_start(&f->e, IOVA_SRC, FAULT_IOVA, PAGE);
	rc = fault_read(f->ffd, pf, f->delivers ? 5000 : 1500);
	st = reg_rd(&f->e, REG_DMA_STATUS);
	if (f->delivers) {
		int ok = rc == 0 && pf->dev_id == f->e.devid && (pf->addr & ~(PAGE - 1)) == FAULT_IOVA &&
			 (pf->perm & IOMMU_PGFAULT_PERM_WRITE) && (pf->flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE) &&
			 (st & ST_STALLED);
		rep_step(r, what, ok, "\"errno\":%d,\"addr\":\"0x%llx\",\"perm\":%u,\"flags\":%u,\"dev_id_ok\":%s,%s",
			 rc < 0 ? -rc : 0, (unsigned long long)pf->addr, pf->perm, pf->flags,
			 pf->dev_id == f->e.devid ? "true" : "false", status_json(st, s, sizeof(s)));
		return ok ? 0 : -1;
	}
	st = engine_wait(&f->e, 5000);
	rep_step(r, what, rc == -ETIMEDOUT && st != ST_TIMEOUT && (st & ST_ERROR) && ST_EVENT(st) == EVT_F_TRANSLATION,
		 "\"delivered\":%s,%s,\"expect\":\"no record; the transfer is terminated\"", rc == 0 ? "true" : "false",
		 status_json(st, s, sizeof(s)));
	return -1; /* nothing pending */
}

/* a pending fault answered by the kernel when the device leaves the fault-capable HWPT */
static void fault_auto_response(struct report *r, struct fault_env *f, const char *how)
{
	struct iommu_hwpt_pgfault pf = { 0 };
	char op[96], s[200];
	uint32_t st;
	int rc;

	if (rep_call(r, "attach the fault-capable HWPT", vfio_attach(&f->e, f->hwpt_f)) < 0)
		return;
	snprintf(op, sizeof(op), "fault pending before %s", how);
	if (fault_raise(r, f, op, &pf))
		return;
	rc = !strcmp(how, "detach") ? vfio_detach(&f->e) : vfio_attach(&f->e, f->hwpt_plain);
	snprintf(op, sizeof(op), "%s with the fault pending", how);
	rep_call(r, op, rc);
	st = engine_wait(&f->e, 5000);
	snprintf(op, sizeof(op), "the stalled transfer fails after %s", how);
	rep_step(r, op, st != ST_TIMEOUT && (st & ST_ERROR) && ST_EVENT(st) == EVT_F_TRANSLATION,
		 "%s,\"source\":\"iommufd/fault.c iommufd_auto_response_faults: pending groups answered "
		 "IOMMU_PAGE_RESP_INVALID (CMD_RESUME abort)\"", status_json(st, s, sizeof(s)));
	snprintf(op, sizeof(op), "a late response after %s", how);
	rep_refusal(r, op, fault_respond(f->ffd, pf.cookie, IOMMUFD_PAGE_RESP_SUCCESS), EINVAL,
		    "iommufd/fault.c iommufd_fault_fops_write: the cookie was answered already");
}

/* the stall answered by user space: map the page, respond SUCCESS, the copy completes */
static void fault_served(struct report *r, struct fault_env *f)
{
	struct iommu_hwpt_pgfault pf = { 0 };
	char s[200];
	uint32_t st;

	if (fault_raise(r, f, "the engine faults on an unmapped page", &pf))
		return;
	rep_call(r, "IOMMU_IOAS_MAP the faulting page", ioas_map(f->ifd, f->ioas, FAULT_IOVA, f->dst, PAGE));
	rep_call(r, "write the response (SUCCESS)", fault_respond(f->ffd, pf.cookie, IOMMUFD_PAGE_RESP_SUCCESS));
	st = engine_wait(&f->e, 5000);
	rep_step(r, "the stalled transfer completes", (st & ST_DONE) && !memcmp(f->src, f->dst, PAGE), "%s",
		 status_json(st, s, sizeof(s)));
	rep_call(r, "IOMMU_IOAS_UNMAP the page again", ioas_unmap(f->ifd, f->ioas, FAULT_IOVA, PAGE));
}

static int fault_setup(struct ctx *c, struct report *r, struct fault_env *f)
{
	int forced = IDR0_STALL_MODEL(c->idr0) == 2, rc;
	const char *why = fault_path(forced, &f->delivers);

	rep_field(r, "\"stall_forced\":%s,\"delivers\":%s", forced ? "true" : "false",
		  f->delivers && c->major >= 7 ? "true" : "false");
	if (engine_open_iommufd(r, c->bdf, &f->e, &f->ifd) ||
	    rep_call(r, "IOMMU_IOAS_ALLOC", ioas_alloc(f->ifd, &f->ioas)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP src", ioas_map(f->ifd, f->ioas, IOVA_SRC, f->src, LEN)) < 0 ||
	    rep_call(r, "IOMMU_FAULT_QUEUE_ALLOC", fault_queue_alloc(f->ifd, &f->fault_id, &f->ffd)) < 0)
		return -1;
	rc = hwpt_alloc(f->ifd, f->e.devid, f->ioas, IOMMU_HWPT_FAULT_ID_VALID, f->fault_id, &f->hwpt_f);
	if (c->major < 7) {
		rep_refusal(r, "IOMMU_HWPT_ALLOC FAULT_ID_VALID", rc, EOPNOTSUPP,
			    "6.12 iommufd_hwpt_paging_alloc: valid_flags are NEST_PARENT | DIRTY_TRACKING (fault-capable "
			    "HWPTs only for nested domains, which 6.12 arm-smmu-v3 cannot allocate)");
		return -1;
	}
	if (rep_call(r, "IOMMU_HWPT_ALLOC FAULT_ID_VALID", rc) < 0 ||
	    rep_call(r, "IOMMU_HWPT_ALLOC plain", hwpt_alloc(f->ifd, f->e.devid, f->ioas, 0, 0, &f->hwpt_plain)) < 0)
		return -1;
	rep_refusal(r, "IOMMU_HWPT_ALLOC FAULT_ID_VALID with a bad fault id",
		    hwpt_alloc(f->ifd, f->e.devid, f->ioas, IOMMU_HWPT_FAULT_ID_VALID, f->ioas, &(uint32_t){ 0 }), ENOENT,
		    "iommufd_hwpt_alloc -> iommufd_get_fault: the id names an IOAS, not a FAULT object (ENOENT)");
	if (forced && !(c->features & FEAT_SVA) && !c->unsafe) {
		rep_step(r, "attach the fault-capable HWPT", 0, "\"not_run\":true,\"features\":\"0x%x\",\"kernel_bug\":"
			 "\"arm-smmu-v3 allocates its IOPF queue (evtq.iopf) only with FEAT_SVA; without it "
			 "arm_smmu_enable_iopf passes NULL to iopf_queue_add_device for a stall master: NULL "
			 "dereference (seen with 7.3.4; --unsafe runs it)\"", c->features);
		return -1;
	}
	rc = vfio_attach(&f->e, f->hwpt_f);
	rep_step(r, "attach the fault-capable HWPT", rc >= 0, "\"errno\":%d,\"source\":\"%s\"", rc < 0 ? -rc : 0, why);
	return rc < 0 ? -1 : 0;
}

static int check_fault(struct ctx *c, struct report *r)
{
	struct fault_env f = { .ifd = -1, .ffd = -1, .src = buf_alloc(LEN), .dst = buf_alloc(LEN) };

	f.e.fd = -1;
	fill_pattern(f.src, LEN, 20);
	if (fault_setup(c, r, &f))
		goto out;
	fault_served(r, &f);
	if (f.delivers) {
		fault_auto_response(r, &f, "replace");
		fault_auto_response(r, &f, "detach");
	}
	vfio_detach(&f.e);
	obj_destroy(f.ifd, f.hwpt_f);
	obj_destroy(f.ifd, f.hwpt_plain);
	obj_destroy(f.ifd, f.ioas);
out:
	if (f.ffd >= 0)
		close(f.ffd);
	engine_close(&f.e, f.ifd);
	return r->ok;
}

/* --- check "dirty": dirty tracking with the SMMU's HTTU dirty state --------------------- */
static const unsigned DIRTY_PAGES[] = { 1, 3, 4, 9 };

/* one-page copies src page i -> dst page i; the bit of each page whose copy completed with
 * the data as the source has it */
static uint64_t dirty_write_pages(struct engine *e, const uint8_t *src, const uint8_t *dst, const unsigned *pages,
				  size_t n)
{
	uint64_t want = 0;

	for (size_t i = 0; i < n; i++) {
		uint32_t st = engine_copy(e, IOVA_SRC + pages[i] * PAGE, IOVA_DST + pages[i] * PAGE, PAGE);

		if ((st & ST_DONE) && !memcmp(src + pages[i] * PAGE, dst + pages[i] * PAGE, PAGE))
			want |= 1ULL << pages[i];
	}
	return want;
}

static void dirty_bitmaps(struct report *r, struct engine *e, int ifd, uint32_t hwpt, const uint8_t *src,
			  const uint8_t *dst)
{
	uint64_t want, bits = 0, src_bits = 0, again = 0;
	unsigned five = 5;

	dirty_bitmap(ifd, hwpt, IOVA_DST, 16, 0, &bits); /* start clean */
	want = dirty_write_pages(e, src, dst, DIRTY_PAGES, sizeof(DIRTY_PAGES) / sizeof(DIRTY_PAGES[0]));
	rep_call(r, "IOMMU_HWPT_GET_DIRTY_BITMAP dst", dirty_bitmap(ifd, hwpt, IOVA_DST, 16, 0, &bits));
	dirty_bitmap(ifd, hwpt, IOVA_SRC, 16, 0, &src_bits);
	rep_step(r, "exactly the written pages are dirty", bits == want && want == 0x21a && !src_bits,
		 "\"bitmap\":\"0x%llx\",\"written_data_ok\":\"0x%llx\",\"src_bitmap\":\"0x%llx\"", (unsigned long long)bits,
		 (unsigned long long)want, (unsigned long long)src_bits);
	dirty_bitmap(ifd, hwpt, IOVA_DST, 16, 0, &again);
	rep_step(r, "the read cleared the bitmap", again == 0, "\"bitmap\":\"0x%llx\"", (unsigned long long)again);
	want = dirty_write_pages(e, src, dst, &five, 1);
	dirty_bitmap(ifd, hwpt, IOVA_DST, 16, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, &bits);
	dirty_bitmap(ifd, hwpt, IOVA_DST, 16, 0, &again);
	rep_step(r, "NO_CLEAR leaves the dirty state", bits == want && again == want && want == 0x20,
		 "\"no_clear\":\"0x%llx\",\"then\":\"0x%llx\"", (unsigned long long)bits, (unsigned long long)again);
}

static int check_dirty(struct ctx *c, struct report *r)
{
	uint8_t *src = buf_alloc(LEN), *dst = buf_alloc(LEN);
	int capable = c->dt_coherent && IDR0_HTTU(c->idr0) == 2;
	uint32_t ioas = 0, hwpt = 0;
	struct engine e = { .fd = -1 };
	int ifd = -1, rc;

	fill_pattern(src, LEN, 30);
	rep_field(r, "\"httu\":%u,\"capable\":%s", IDR0_HTTU(c->idr0), capable ? "true" : "false");
	if (engine_open_iommufd(r, c->bdf, &e, &ifd) ||
	    rep_call(r, "IOMMU_IOAS_ALLOC", ioas_alloc(ifd, &ioas)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP src", ioas_map(ifd, ioas, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP dst", ioas_map(ifd, ioas, IOVA_DST, dst, LEN)) < 0)
		goto out;
	rc = hwpt_alloc(ifd, e.devid, ioas, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 0, &hwpt);
	if (!capable) {
		rep_refusal(r, "IOMMU_HWPT_ALLOC DIRTY_TRACKING", rc, EOPNOTSUPP,
			    "iommufd/hw_pagetable.c: !IOMMU_CAP_DIRTY_TRACKING (arm_smmu_dbm_capable: FEAT_HD from "
			    "IDR0.HTTU=2, and FEAT_COHERENCY)");
		goto out;
	}
	if (rep_call(r, "IOMMU_HWPT_ALLOC DIRTY_TRACKING", rc) < 0 ||
	    rep_call(r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", vfio_attach(&e, hwpt)) < 0 ||
	    rep_call(r, "IOMMU_HWPT_SET_DIRTY_TRACKING on", dirty_tracking(ifd, hwpt, 1)) < 0)
		goto out;
	dirty_bitmaps(r, &e, ifd, hwpt, src, dst);
	rep_call(r, "IOMMU_HWPT_SET_DIRTY_TRACKING off", dirty_tracking(ifd, hwpt, 0));
	rep_call(r, "VFIO_DEVICE_DETACH_IOMMUFD_PT", vfio_detach(&e));
	rep_call(r, "IOMMU_DESTROY hwpt", obj_destroy(ifd, hwpt));
out:
	if (ioas)
		obj_destroy(ifd, ioas);
	engine_close(&e, ifd);
	return r->ok;
}

/* --- check "nesting": NEST_PARENT, the vIOMMU (what the kernel allows for this SMMU) ------- */
#define IDR3_FWB(v) (((v) >> 8) & 1)

#define NEST_IPA 0x50000000ULL /* the nested domain's guest memory: CD, tables, data */
#define NEST_SIZE 0x40000UL

#ifdef IOMMU_VIOMMU_ALLOC
/*
 * The nested path: the test plays the VMM's guest.  In a buffer it maps into the IOAS
 * (NEST_IPA: its IOVAs are the nested domain's IPAs) it writes a CD and a 4-level
 * stage-1 table (4 KiB granule, 48-bit VA) that map NEST_VA_SRC / NEST_VA_DST onto pages
 * of the same buffer; the vSTE points at the CD.  The engine's DMA then goes through
 * stage 1 (this table) and stage 2 (the NEST_PARENT HWPT over the IOAS).
 */
#define NEST_CD 0x0000UL
#define NEST_L0 0x1000UL /* L0, L1, L2, L3 tables at 0x1000 .. 0x4000 */
#define NEST_L0B 0x5000UL /* a second set (the CD switched to, CFGI_CD) at 0x5000 .. 0x8000 */
#define NEST_SRC 0x10000UL
#define NEST_DST 0x20000UL
#define NEST_DST2 0x30000UL
#define NEST_LEN 0x4000U /* 4 pages */
#define NEST_VA 0x20000000ULL /* L0 0, L1 0, L2 256 */
#define NEST_VA_SRC (NEST_VA + 0x0000)
#define NEST_VA_DST (NEST_VA + 0x10000)
#define NEST_VA_HOLE (NEST_VA + 0x80000) /* no stage-1 mapping */
#define NEST_VSID 0x42u
#define NEST_ASID 0x21u
/* arm64 VMSA descriptors and the SMMUv3 CD / STE / command fields the test writes */
#define DESC_TABLE 3ULL
#define PTE_PAGE (3ULL | (1ULL << 2) /* AttrIndx 1 */ | (1ULL << 6) /* AP unpriv RW */ | \
		  (3ULL << 8) /* inner shareable */ | (1ULL << 10) /* AF */ | (1ULL << 11) /* nG */)
#define CD0 (16ULL /* T0SZ */ | (1ULL << 8) | (1ULL << 10) /* IR0, OR0 WBWA */ | (3ULL << 12) /* SH0 */ | \
	     (1ULL << 30) /* EPD1 */ | (1ULL << 31) /* V */ | (5ULL << 32) /* IPS 48 */ | \
	     (1ULL << 41) /* AA64 */ | (1ULL << 45) /* R */ | (1ULL << 46) /* A */ | \
	     (1ULL << 47) /* ASET */ | ((uint64_t)NEST_ASID << 48))
#define MAIR_NC_WBWA 0xff44ULL /* Attr0 normal non-cacheable, Attr1 write-back */
#define STE0_S1_TRANS (1ULL /* V */ | (5ULL << 1) /* Config S1 translate */)
#define STE1_S1_ATTRS ((1ULL << 2) | (1ULL << 4) | (3ULL << 6)) /* S1CIR, S1COR WBRA; S1CSH ISH */
#define CMD_TLBI_NH_VA 0x12ULL
#define CMD_TLBI_NH_ASID 0x11ULL
#define CMD_CFGI_CD 0x05ULL /* SID [63:32], SSID [31:12]; Leaf in word 1 */
#define EVT_S2(w1) (((w1) >> 39) & 1)

struct nest {
	uint8_t *mem; /* NEST_SIZE bytes at IPA NEST_IPA */
	uint32_t viommu, vdev, hwpt, veventq;
	int vfd;
};

static uint64_t *nest_u64(struct nest *n, unsigned long off)
{
	return (uint64_t *)(n->mem + off);
}

/* the CD and the stage-1 tables at `l0`: NEST_VA_SRC -> SRC pages, NEST_VA_DST -> `dst` pages */
static void nest_tables(struct nest *n, unsigned long l0, unsigned long dst)
{
	uint64_t *cd = nest_u64(n, NEST_CD), *l3 = nest_u64(n, l0 + 3 * PAGE);

	for (int i = 0; i < 3; i++) /* L0[0] -> L1, L1[0] -> L2, L2[256] -> L3 */
		nest_u64(n, l0 + i * PAGE)[i == 2 ? 256 : 0] = (NEST_IPA + l0 + (i + 1) * PAGE) | DESC_TABLE;
	for (unsigned p = 0; p < NEST_LEN / PAGE; p++) {
		l3[(NEST_VA_SRC - NEST_VA) / PAGE + p] = (NEST_IPA + NEST_SRC + p * PAGE) | PTE_PAGE;
		l3[(NEST_VA_DST - NEST_VA) / PAGE + p] = (NEST_IPA + dst + p * PAGE) | PTE_PAGE;
	}
	cd[1] = NEST_IPA + l0; /* TTB0 */
	cd[3] = MAIR_NC_WBWA;
	__sync_synchronize();
	cd[0] = CD0; /* valid last */
	__sync_synchronize();
}

/* IOMMU_HWPT_INVALIDATE through the vIOMMU: `num` ARM_SMMUV3 commands */
static int nest_invalidate(int ifd, struct nest *n, struct iommu_viommu_arm_smmuv3_invalidate *cmds,
			   uint32_t num, uint32_t *done)
{
	struct iommu_hwpt_invalidate inv = {
		.size = sizeof(inv), .hwpt_id = n->viommu, .data_uptr = (uintptr_t)cmds,
		.data_type = IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, .entry_len = sizeof(cmds[0]),
		.entry_num = num,
	};
	int rc = ioctl(ifd, IOMMU_HWPT_INVALIDATE, &inv) ? -errno : 0;

	*done = inv.entry_num;
	return rc;
}

/* TLBI_NH_VA (leaf) for each page of NEST_VA_DST */
static int nest_invalidate_dst(int ifd, struct nest *n, uint32_t *done)
{
	struct iommu_viommu_arm_smmuv3_invalidate cmds[NEST_LEN / PAGE];

	for (unsigned p = 0; p < NEST_LEN / PAGE; p++) {
		cmds[p].cmd[0] = CMD_TLBI_NH_VA | ((uint64_t)NEST_ASID << 48);
		cmds[p].cmd[1] = (NEST_VA_DST + p * PAGE) | 1 /* Leaf */;
	}
	return nest_invalidate(ifd, n, cmds, NEST_LEN / PAGE, done);
}

/* the CD changed (new TTB0): CFGI_CD of the vSID's SSID 0 (leaf), then TLBI_NH_ASID */
static int nest_invalidate_cd(int ifd, struct nest *n, uint32_t *done)
{
	struct iommu_viommu_arm_smmuv3_invalidate cmds[2] = {
		{ .cmd = { CMD_CFGI_CD | ((uint64_t)NEST_VSID << 32), 1 /* Leaf */ } },
		{ .cmd = { CMD_TLBI_NH_ASID | ((uint64_t)NEST_ASID << 48), 0 } },
	};

	return nest_invalidate(ifd, n, cmds, 2, done);
}

/* one vEVENT from the vEVENTQ fd (header + the SMMUv3 record), waiting up to 5 s */
static int nest_read_vevent(struct nest *n, struct iommufd_vevent_header *h, struct iommu_vevent_arm_smmuv3 *ev)
{
	uint8_t buf[sizeof(*h) + sizeof(*ev)];
	double end = now_s() + 5;

	for (;;) {
		ssize_t got = read(n->vfd, buf, sizeof(buf));

		if (got == (ssize_t)sizeof(buf)) {
			memcpy(h, buf, sizeof(*h));
			memcpy(ev, buf + sizeof(*h), sizeof(*ev));
			return 0;
		}
		if (got > 0)
			return -EMSGSIZE;
		if (got < 0 && errno != EAGAIN)
			return -errno;
		if (now_s() > end)
			return -ETIMEDOUT;
		sleep_us(10000);
	}
}

/* vIOMMU, vDEVICE, vEVENTQ, the nested HWPT from a vSTE, attach */
static int nest_setup(struct report *r, struct engine *e, int ifd, uint32_t parent, struct nest *n)
{
	struct iommu_viommu_alloc v = { .size = sizeof(v), .type = IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
					.dev_id = e->devid, .hwpt_id = parent };
	struct iommu_vdevice_alloc vd = { .size = sizeof(vd), .dev_id = e->devid, .virt_id = NEST_VSID };
	struct iommu_veventq_alloc q = { .size = sizeof(q), .type = IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
					 .veventq_depth = 16 };
	struct iommu_hwpt_arm_smmuv3 vste = { .ste = { STE0_S1_TRANS | (NEST_IPA + NEST_CD), STE1_S1_ATTRS } };
	struct iommu_hwpt_alloc h = { .size = sizeof(h), .dev_id = e->devid,
				      .data_type = IOMMU_HWPT_DATA_ARM_SMMUV3, .data_len = sizeof(vste),
				      .data_uptr = (uintptr_t)&vste };

	if (rep_call(r, "IOMMU_VIOMMU_ALLOC ARM_SMMUV3", ioctl_rc(ifd, IOMMU_VIOMMU_ALLOC, (unsigned long)&v)) < 0)
		return -1;
	n->viommu = vd.viommu_id = q.viommu_id = h.pt_id = v.out_viommu_id;
	if (rep_call(r, "IOMMU_VDEVICE_ALLOC vSID 0x42", ioctl_rc(ifd, IOMMU_VDEVICE_ALLOC, (unsigned long)&vd)) < 0)
		return -1;
	n->vdev = vd.out_vdevice_id;
	if (rep_call(r, "IOMMU_VEVENTQ_ALLOC ARM_SMMUV3", ioctl_rc(ifd, IOMMU_VEVENTQ_ALLOC, (unsigned long)&q)) < 0)
		return -1;
	n->veventq = q.out_veventq_id;
	n->vfd = (int)q.out_veventq_fd;
	fcntl(n->vfd, F_SETFL, fcntl(n->vfd, F_GETFL) | O_NONBLOCK);
	nest_tables(n, NEST_L0, NEST_DST);
	if (rep_call(r, "IOMMU_HWPT_ALLOC nested from a vSTE (S1 CD table)",
		     ioctl_rc(ifd, IOMMU_HWPT_ALLOC, (unsigned long)&h)) < 0)
		return -1;
	n->hwpt = h.out_hwpt_id;
	return rep_call(r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT nested", vfio_attach(e, n->hwpt)) < 0 ? -1 : 0;
}

/* a change of the stage-1 translation of NEST_VA_DST, invalidated through the vIOMMU */
struct nest_move {
	const char *inv, *dma, *old; /* the steps' names */
	unsigned long l0, to, from; /* the tables written, the new target, the old target */
	int seed; /* pattern copied now (the old target holds seed - 1) */
	int (*invalidate)(int ifd, struct nest *n, uint32_t *done);
};

static int nest_move(struct report *r, struct engine *e, int ifd, struct nest *n, const struct nest_move *m)
{
	uint8_t *src = n->mem + NEST_SRC, *to = n->mem + m->to;
	uint32_t done = 0;
	int rc;

	nest_tables(n, m->l0, m->to);
	rc = m->invalidate(ifd, n, &done);
	rep_step(r, m->inv, rc == 0, "\"rc\":%d,\"done\":%u", rc, done);
	fill_pattern(src, NEST_LEN, m->seed);
	memset(to, 0, NEST_LEN);
	if (rep_dma_ok(r, m->dma, e, NEST_VA_SRC, NEST_VA_DST, src, to, NEST_LEN) < 0)
		return -1;
	fill_pattern(src, NEST_LEN, m->seed - 1);
	rep_step(r, m->old, !memcmp(src, n->mem + m->from, NEST_LEN), NULL);
	return 0;
}

/* DMA through both stages; new stage-1 translations after invalidation through the vIOMMU:
 * the same table pointing at DST2 (TLBI_NH_VA), then the CD switched to a second table that
 * points at DST again (CFGI_CD + TLBI_NH_ASID) */
static void nest_dma(struct report *r, struct engine *e, int ifd, struct nest *n)
{
	static const struct nest_move moves[] = {
		{ "IOMMU_HWPT_INVALIDATE vIOMMU TLBI_NH_VA x4", "DMA follows the new stage-1 mapping",
		  "old stage-1 target untouched", NEST_L0, NEST_DST2, NEST_DST, 6, nest_invalidate_dst },
		{ "IOMMU_HWPT_INVALIDATE vIOMMU CFGI_CD + TLBI_NH_ASID", "DMA follows the new CD's stage-1 table",
		  "stage-1 target of the old CD untouched", NEST_L0B, NEST_DST, NEST_DST2, 7, nest_invalidate_cd },
	};
	uint8_t *src = n->mem + NEST_SRC, *dst = n->mem + NEST_DST;

	fill_pattern(src, NEST_LEN, 5);
	memset(dst, 0, NEST_LEN);
	if (rep_dma_ok(r, "DMA through stage 1 (the test's table) and stage 2 (the IOAS)", e, NEST_VA_SRC,
		       NEST_VA_DST, src, dst, NEST_LEN) < 0)
		return;
	for (unsigned i = 0; i < sizeof(moves) / sizeof(moves[0]); i++)
		if (nest_move(r, e, ifd, n, &moves[i]) < 0)
			return;
}

/* a stage-1 fault reaches the vEVENTQ with the virtual StreamID */
static void nest_vevent(struct report *r, struct engine *e, struct nest *n)
{
	struct iommufd_vevent_header h = { 0 };
	struct iommu_vevent_arm_smmuv3 ev = { { 0 } };
	uint8_t *dst2 = n->mem + NEST_DST2;
	int rc, ok;

	memset(dst2, 0x5A, NEST_LEN);
	rep_dma_refused(r, "DMA to an IOVA stage 1 does not map", e, NEST_VA_SRC, NEST_VA_HOLE, dst2, 0x5A, PAGE,
			EVT_F_TRANSLATION);
	rc = nest_read_vevent(n, &h, &ev);
	ok = rc == 0 && (ev.evt[0] & 0xff) == EVT_F_TRANSLATION && (ev.evt[0] >> 32) == NEST_VSID &&
	     ev.evt[2] == NEST_VA_HOLE && !EVT_S2(ev.evt[1]);
	rep_step(r, "vEVENTQ: F_TRANSLATION with the vSID", ok,
		 "\"rc\":%d,\"event\":%u,\"vsid\":%u,\"addr\":\"0x%llx\",\"s2\":%u,\"sequence\":%u,\"source\":"
		 "\"arm-smmu-v3.c arm_smmu_handle_event: a stage-1 event of a vmaster goes to its vEVENTQ "
		 "(arm_vmaster_report_event puts the vSID in)\"",
		 rc, rc ? 0 : (unsigned)(ev.evt[0] & 0xff), rc ? 0 : (unsigned)(ev.evt[0] >> 32),
		 rc ? 0ULL : (unsigned long long)ev.evt[2], rc ? 0 : (unsigned)EVT_S2(ev.evt[1]), rc ? 0 : h.sequence);
}

static void nest_teardown(struct report *r, struct engine *e, int ifd, struct nest *n)
{
	if (n->hwpt) {
		rep_call(r, "VFIO_DEVICE_DETACH_IOMMUFD_PT", vfio_detach(e));
		rep_call(r, "IOMMU_DESTROY nested HWPT", obj_destroy(ifd, n->hwpt));
	}
	if (n->veventq) {
		close(n->vfd);
		rep_call(r, "IOMMU_DESTROY vEVENTQ", obj_destroy(ifd, n->veventq));
	}
	if (n->vdev)
		rep_call(r, "IOMMU_DESTROY vDEVICE", obj_destroy(ifd, n->vdev));
	if (n->viommu)
		rep_call(r, "IOMMU_DESTROY vIOMMU", obj_destroy(ifd, n->viommu));
}
#endif

/* the vIOMMU on a NEST_PARENT HWPT (7.x): refused without S2FWB (or CANWBS, IORT only);
 * with it, the nested path above */
static void nesting_viommu(struct ctx *c, struct report *r, struct engine *e, int ifd, uint32_t parent,
			   uint8_t *mem)
{
#ifdef IOMMU_VIOMMU_ALLOC
	uint32_t idr3 = smmu_reg(c->smmu_base, 0x0C);
	struct nest n = { .mem = mem, .vfd = -1 };

	rep_field(r, "\"idr3\":\"0x%x\",\"s2fwb\":%s", idr3, IDR3_FWB(idr3) ? "true" : "false");
	if (!IDR3_FWB(idr3)) {
		struct iommu_viommu_alloc v = { .size = sizeof(v), .type = IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
						.dev_id = e->devid, .hwpt_id = parent };

		rep_refusal(r, "IOMMU_VIOMMU_ALLOC ARM_SMMUV3", ioctl_rc(ifd, IOMMU_VIOMMU_ALLOC, (unsigned long)&v),
			    EOPNOTSUPP,
			    "arm-smmu-v3-iommufd.c arm_smmu_get_viommu_size: no ARM_SMMU_FEAT_S2FWB (IDR3.FWB) and the "
			    "master is not CANWBS (ACPI IORT only), or no ARM_SMMU_V3_IOMMUFD: viommu_size 0");
		return;
	}
	if (nest_setup(r, e, ifd, parent, &n) == 0) {
		nest_dma(r, e, ifd, &n);
		nest_vevent(r, e, &n);
	}
	nest_teardown(r, e, ifd, &n);
#else
	(void)c; (void)e; (void)ifd; (void)parent; (void)mem;
	rep_field(r, "\"viommu_uapi\":false");
#endif
}

static int check_nesting(struct ctx *c, struct report *r)
{
	uint32_t ioas = 0, parent = 0;
	struct engine e = { .fd = -1 };
	uint8_t *mem = buf_alloc(NEST_SIZE);
	int ifd = -1, rc;

	if (engine_open_iommufd(r, c->bdf, &e, &ifd) || rep_call(r, "IOMMU_IOAS_ALLOC", ioas_alloc(ifd, &ioas)) < 0)
		goto out;
	rc = hwpt_alloc(ifd, e.devid, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, &parent);
	if (c->major < 7) {
		rep_refusal(r, "IOMMU_HWPT_ALLOC NEST_PARENT", rc, EOPNOTSUPP,
			    "6.12 arm_smmu_domain_alloc_user takes DIRTY_TRACKING only (nesting came with "
			    "arm-smmu-v3-iommufd.c)");
		goto out;
	}
	if (rep_call(r, "IOMMU_HWPT_ALLOC NEST_PARENT", rc) < 0)
		goto out;
	memset(mem, 0, NEST_SIZE);
	if (rep_call(r, "IOMMU_IOAS_MAP the nested domain's IPA space", ioas_map(ifd, ioas, NEST_IPA, mem, NEST_SIZE)) == 0)
		nesting_viommu(c, r, &e, ifd, parent, mem);
	obj_destroy(ifd, parent);
out:
	if (ioas)
		obj_destroy(ifd, ioas);
	engine_close(&e, ifd);
	if (mem)
		munmap(mem, NEST_SIZE);
	return r->ok;
}

/* --- check "group": DMA ownership of a multi-device iommu group ------------------------- */
/* second engine's cdev bound to `ifd`; records the step */
static int group_open_b(struct report *r, struct ctx *c, struct engine *b, int ifd)
{
	memset(b, 0, sizeof(*b));
	b->sid = c->sid2;
	b->fd = cdev_open(c->bdf2);
	if (rep_call(r, "open B's vfio cdev", b->fd < 0 ? b->fd : 0) < 0 ||
	    rep_call(r, "VFIO_DEVICE_BIND_IOMMUFD B (same iommufd)", vfio_bind(b, ifd)) < 0 ||
	    rep_call(r, "engine B BAR0 + bus master", engine_setup(b)) < 0)
		return -1;
	return 0;
}

/* B in a second iommufd while A's iommufd owns the group: refused */
static void group_other_owner(struct report *r, struct ctx *c)
{
	struct engine b = { .fd = cdev_open(c->bdf2) };
	int ifd2 = open("/dev/iommu", O_RDWR);

	rep_refusal(r, "VFIO_DEVICE_BIND_IOMMUFD B to a second iommufd", b.fd < 0 ? b.fd : vfio_bind(&b, ifd2), EPERM,
		    "iommu.c iommu_device_claim_dma_owner: the group is owned by A's iommufd (another owner)");
	engine_close(&b, ifd2);
}

/* both attached to one HWPT: both DMA through the shared domain */
static void group_shared(struct report *r, struct engine *a, struct engine *b, int ifd, uint32_t ioas,
			 uint8_t *src, uint8_t *dst)
{
	uint32_t hwpt1 = 0, hwpt2 = 0;

	if (rep_call(r, "IOMMU_HWPT_ALLOC 1", hwpt_alloc(ifd, a->devid, ioas, 0, 0, &hwpt1)) < 0 ||
	    rep_call(r, "IOMMU_HWPT_ALLOC 2", hwpt_alloc(ifd, b->devid, ioas, 0, 0, &hwpt2)) < 0 ||
	    rep_call(r, "attach A to HWPT 1", vfio_attach(a, hwpt1)) < 0)
		return;
	rep_refusal(r, "attach B to HWPT 2", vfio_attach(b, hwpt2), EINVAL,
		    "iommufd/device.c iommufd_hw_pagetable_attach: the group is attached to another HWPT");
	if (rep_call(r, "attach B to HWPT 1", vfio_attach(b, hwpt1)) < 0)
		return;
	fill_pattern(src, LEN, 40);
	rep_dma_ok(r, "DMA by A", a, IOVA_SRC, IOVA_DST, src, dst, LEN);
	fill_pattern(src, LEN, 41);
	rep_dma_ok(r, "DMA by B", b, IOVA_SRC, IOVA_DST, src, dst, LEN);
	rep_call(r, "detach A", vfio_detach(a));
	fill_pattern(src, LEN, 42);
	/* iommufd/device.c iommufd_hw_pagetable_detach: the group leaves the HWPT with its last
	 * device, so A still translates through the domain B holds */
	rep_dma_ok(r, "DMA by A after its detach (B keeps the group's domain)", a, IOVA_SRC, IOVA_DST, src, dst, LEN);
	rep_call(r, "detach B", vfio_detach(b));
	memset(dst, 0x3C, LEN);
	rep_dma_refused(r, "DMA by A with the group detached (blocked)", a, IOVA_SRC, IOVA_DST, dst, 0x3C, LEN,
			EVT_ABORT);
	obj_destroy(ifd, hwpt1);
	obj_destroy(ifd, hwpt2);
}

/* B in its kernel driver (a DMA API user): A cannot be bound to an iommufd; the driver works */
static void group_kernel_driver(struct report *r, struct ctx *c)
{
	struct engine a = { .fd = cdev_open(c->bdf) };
	int ifd = open("/dev/iommu", O_RDWR);

	rep_call(r, "bind B to " KDRIVER, pci_rebind(c->bdf2, KDRIVER));
	rep_refusal(r, "VFIO_DEVICE_BIND_IOMMUFD A with B in a kernel driver", a.fd < 0 ? a.fd : vfio_bind(&a, ifd),
		    EPERM, "iommu.c iommu_device_claim_dma_owner: the group's DMA API user has no owner (owner != ictx)");
	rep_kdriver_copy(r, "DMA API copy by B's kernel driver");
	engine_close(&a, ifd);
	rep_call(r, "bind B to vfio-pci again", pci_rebind(c->bdf2, "vfio-pci"));
}

/* A owned by an iommufd: B cannot join a kernel driver */
static void group_kernel_driver_refused(struct report *r, struct ctx *c)
{
	char drv[64];

	pci_rebind(c->bdf2, KDRIVER);
	pci_driver_of(c->bdf2, drv, sizeof(drv));
	rep_step(r, "B cannot bind its kernel driver while A is owned", strcmp(drv, KDRIVER) != 0,
		 "\"driver\":\"%s\",\"source\":\"iommu.c iommu_device_use_default_domain: the group has a user "
		 "owner -> EBUSY (pci_dma_configure fails the probe)\"", drv);
	rep_call(r, "bind B to vfio-pci again", pci_rebind(c->bdf2, "vfio-pci"));
}

/* everything closed: B's kernel driver gets the group's DMA API domain back */
static void group_back_to_kernel(struct report *r, struct ctx *c)
{
	char type[32];

	rep_call(r, "bind B to " KDRIVER " after the user let go", pci_rebind(c->bdf2, KDRIVER));
	group_type(c->group, type, sizeof(type));
	rep_step(r, "the group is back on a DMA API domain", !strncmp(type, "DMA", 3), "\"type\":\"%s\"", type);
	rep_kdriver_copy(r, "DMA API copy by B's kernel driver again");
	rep_call(r, "bind B to vfio-pci again", pci_rebind(c->bdf2, "vfio-pci"));
}

static int check_group(struct ctx *c, struct report *r)
{
	uint8_t *src = buf_alloc(LEN), *dst = buf_alloc(LEN);
	char group2[64];
	struct engine a = { .fd = -1 }, b = { .fd = -1 };
	uint32_t ioas = 0;
	int ifd = -1;

	group_of(c->bdf2, group2, sizeof(group2));
	rep_step(r, "the engines share an iommu group", c->group[0] && !strcmp(c->group, group2),
		 "\"group_a\":\"%s\",\"group_b\":\"%s\",\"source\":\"iommu.c pci_device_group: functions of a "
		 "multi-function device without ACS share a group\"", c->group, group2);
	if (kdriver_present())
		group_kernel_driver(r, c);
	else
		rep_field(r, "\"kernel_driver\":\"none (no " KDRIVER " module: its steps not run)\"");
	if (engine_open_iommufd(r, c->bdf, &a, &ifd))
		goto out;
	group_other_owner(r, c);
	if (kdriver_present())
		group_kernel_driver_refused(r, c);
	if (group_open_b(r, c, &b, ifd) ||
	    rep_call(r, "IOMMU_IOAS_ALLOC", ioas_alloc(ifd, &ioas)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP src", ioas_map(ifd, ioas, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "IOMMU_IOAS_MAP dst", ioas_map(ifd, ioas, IOVA_DST, dst, LEN)) < 0)
		goto out;
	group_shared(r, &a, &b, ifd, ioas, src, dst);
	obj_destroy(ifd, ioas);
out:
	engine_close(&b, -1);
	engine_close(&a, ifd);
	if (kdriver_present())
		group_back_to_kernel(r, c);
	return r->ok;
}

struct check {
	const char *name;
	int (*run)(struct ctx *c, struct report *r);
	int needs_two; /* needs BDF2 */
};

static const struct check CHECKS[] = {
	{ "ioas", check_ioas, 0 },
	{ "replace", check_replace, 0 },
	{ "coherency", check_coherency, 0 },
	{ "fault", check_fault, 0 },
	{ "dirty", check_dirty, 0 },
	{ "nesting", check_nesting, 0 },
	{ "group", check_group, 1 },
};

static void env_line(struct ctx *c)
{
	struct report r;

	rep_init(&r, "iommufd-env");
	rep_field(&r, "\"kernel\":\"%s\",\"bdf\":\"%s\",\"sid\":%u,\"group\":\"%s\",\"smmu\":\"0x%llx\","
		  "\"idr0\":\"0x%x\",\"smmu_dt_coherent\":%s", c->release, c->bdf, c->sid, c->group,
		  (unsigned long long)c->smmu_base, c->idr0, c->dt_coherent ? "true" : "false");
	rep_field(&r, "\"bridge\":\"%s\",\"bridge_acs_ctrl\":%d,\"pasid_ctrl\":%d,\"smmu_features\":\"0x%x\"",
		  c->bridge, c->bridge_acs, c->pasid_ctrl, c->features);
	if (c->bdf2[0])
		rep_field(&r, "\"bdf2\":\"%s\",\"sid2\":%u,\"header_types\":[%d,%d]", c->bdf2, c->sid2,
			  pci_header_type(c->bdf), pci_header_type(c->bdf2));
	rep_emit_info(&r);
}

int main(int argc, char **argv)
{
	const char *list = NULL;
	int unsafe = 0;
	struct ctx c;
	int i, failed = 0, ran = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--checks") && i + 1 < argc)
			list = argv[++i];
		else if (!strcmp(argv[i], "--unsafe"))
			unsafe = 1;
		else
			return fprintf(stderr, "usage: %s [--checks LIST] [--unsafe] BDF [BDF2]\n", argv[0]), 2;
	}
	if (i >= argc)
		return fprintf(stderr, "usage: %s [--checks LIST] [--unsafe] BDF [BDF2]\n", argv[0]), 2;
	if (ctx_init(&c, argv[i], i + 1 < argc ? argv[i + 1] : NULL))
		return 2;
	c.unsafe = unsafe;
	env_line(&c);
	for (size_t k = 0; k < sizeof(CHECKS) / sizeof(CHECKS[0]); k++) {
		struct report r;
		char mark[64];

		if (!check_wanted(list, CHECKS[k].name) || (CHECKS[k].needs_two && !c.bdf2[0]))
			continue;
		snprintf(mark, sizeof(mark), "iommufd-%s", CHECKS[k].name);
		rep_init(&r, mark);
		CHECKS[k].run(&c, &r);
		failed += !r.ok;
		ran++;
		rep_emit(&r);
	}
	printf(MARK "iommufd-summary {\"ran\":%d,\"failed\":%d}\n", ran, failed);
	return failed ? 1 : 0;
}
