/*
 * vfio_type1_test: the legacy VFIO container API (/dev/vfio/vfio, VFIO_TYPE1v2_IOMMU, the
 * group file /dev/vfio/<group>) driven against the emulated SMMU with the DMA test engine
 * bound to vfio-pci -- what distributions' kernels ship (Debian's: VFIO=m, no IOMMUFD).
 *
 *     vfio_type1_test [--checks LIST] BDF [BDF2]
 *
 * Same conventions as iommufd_test.c (see vfio_engine.h): one marker per check,
 *     VIOMMU-MARK: type1-<check> {"ok":true,"steps":[...],...}
 * Checks: map (map / unmap, the reserved MSI window, DMA, DMA into the unmapped hole, the
 * driver's event, re-map), remap (the engine copies while its destination IOVA moves from
 * buffer A to buffer B: nothing lands in A once the unmap returned; the group cannot leave
 * its container while a device is open), coherency (VFIO_DMA_CC_IOMMU), group (two
 * functions of one iommu group: viability, one container, both DMA through its domain).
 */
#include "vfio_engine.h"

#define IOVA_SRC 0x40000000ULL
#define IOVA_DST 0x40100000ULL
#define MSI_IOVA 0x8000000ULL
#define LEN (64 * 1024)

struct t1 {
	int container, group;
	struct engine e;
};

static int t1_map(struct t1 *t, uint64_t iova, void *p, uint64_t len)
{
	struct vfio_iommu_type1_dma_map m = {
		.argsz = sizeof(m), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)p, .iova = iova, .size = len,
	};

	return ioctl(t->container, VFIO_IOMMU_MAP_DMA, &m) ? -errno : 0;
}

static int t1_unmap(struct t1 *t, uint64_t iova, uint64_t len)
{
	struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof(u), .iova = iova, .size = len };

	if (ioctl(t->container, VFIO_IOMMU_UNMAP_DMA, &u))
		return -errno;
	return u.size == len ? 0 : -EIO;
}

static int group_status(int group)
{
	struct vfio_group_status st = { .argsz = sizeof(st) };

	return ioctl(group, VFIO_GROUP_GET_STATUS, &st) ? -errno : (int)st.flags;
}

static int open_group(const char *bdf)
{
	char name[64], path[96];
	int fd;

	group_of(bdf, name, sizeof(name));
	snprintf(path, sizeof(path), "/dev/vfio/%s", name);
	fd = open(path, O_RDWR);
	return fd < 0 ? -errno : fd;
}

static int device_fd(struct t1 *t, const char *bdf)
{
	int fd = ioctl(t->group, VFIO_GROUP_GET_DEVICE_FD, bdf);

	return fd < 0 ? -errno : fd;
}

/* container + group + TYPE1v2 + the engine's device fd, BAR0 mapped, bus master on */
static int t1_open(struct report *r, const char *bdf, struct t1 *t)
{
	int st;

	memset(t, 0, sizeof(*t));
	t->e.fd = t->group = -1;
	t->e.sid = bdf_sid(bdf);
	t->container = open("/dev/vfio/vfio", O_RDWR);
	if (rep_call(r, "open /dev/vfio/vfio", t->container < 0 ? -errno : 0) < 0)
		return -1;
	rep_step(r, "VFIO_GET_API_VERSION", ioctl(t->container, VFIO_GET_API_VERSION) == VFIO_API_VERSION, NULL);
	rep_step(r, "VFIO_CHECK_EXTENSION TYPE1v2",
		 ioctl_rc(t->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1, NULL);
	t->group = open_group(bdf);
	if (rep_call(r, "open the group file", t->group) < 0)
		return -1;
	st = group_status(t->group);
	rep_step(r, "VFIO_GROUP_GET_STATUS viable", st >= 0 && (st & VFIO_GROUP_FLAGS_VIABLE), "\"flags\":%d", st);
	if (rep_call(r, "VFIO_GROUP_SET_CONTAINER", ioctl_rc(t->group, VFIO_GROUP_SET_CONTAINER,
							     (unsigned long)&t->container)) < 0 ||
	    rep_call(r, "VFIO_SET_IOMMU TYPE1v2", ioctl_rc(t->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) < 0)
		return -1;
	t->e.fd = device_fd(t, bdf);
	if (rep_call(r, "VFIO_GROUP_GET_DEVICE_FD", t->e.fd < 0 ? t->e.fd : 0) < 0 ||
	    rep_call(r, "engine BAR0 + bus master", engine_setup(&t->e)) < 0)
		return -1;
	if (reg_rd(&t->e, REG_MAGIC) != ENG_MAGIC) {
		rep_step(r, "engine MAGIC", 0, "\"read\":\"0x%x\"", reg_rd(&t->e, REG_MAGIC));
		return -1;
	}
	return 0;
}

static void t1_close(struct t1 *t)
{
	engine_close(&t->e, -1);
	if (t->group >= 0)
		close(t->group);
	if (t->container >= 0)
		close(t->container);
}

/* the IOVA ranges type1 offers: the SW_MSI window must be a hole */
static void t1_iova_ranges(struct report *r, struct t1 *t)
{
	char buf[4096];
	struct vfio_iommu_type1_info *info = (void *)buf;
	struct vfio_info_cap_header *h;
	int hole = 0, n = 0;

	memset(buf, 0, sizeof(buf));
	info->argsz = sizeof(buf);
	if (rep_call(r, "VFIO_IOMMU_GET_INFO", ioctl_rc(t->container, VFIO_IOMMU_GET_INFO, (unsigned long)info)) < 0)
		return;
	for (uint32_t off = (info->flags & VFIO_IOMMU_INFO_CAPS) ? info->cap_offset : 0; off && off < sizeof(buf);
	     off = h->next) {
		h = (void *)(buf + off);
		if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
			struct vfio_iommu_type1_info_cap_iova_range *c = (void *)h;

			n = (int)c->nr_iovas;
			hole = 1;
			for (int i = 0; i < n; i++)
				if (c->iova_ranges[i].start <= MSI_IOVA && c->iova_ranges[i].end >= MSI_IOVA)
					hole = 0;
		}
	}
	rep_step(r, "the IOVA ranges leave out the SW_MSI window", hole, "\"ranges\":%d,\"source\":\"vfio_iommu_type1.c "
		 "vfio_iommu_resv_exclude: reserved regions (arm-smmu-v3 MSI_IOVA_BASE) are not IOVA\"", n);
}

/* --- check "map" -------------------------------------------------------------------------- */
static int check_map(struct ctx *c, struct report *r)
{
	uint8_t *src = buf_alloc(LEN), *dst = buf_alloc(LEN);
	struct smmu_event ev;
	struct t1 t;
	int rc;

	if (t1_open(r, c->bdf, &t))
		goto out;
	t1_iova_ranges(r, &t);
	fill_pattern(src, LEN, 1);
	if (rep_call(r, "VFIO_IOMMU_MAP_DMA src", t1_map(&t, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "VFIO_IOMMU_MAP_DMA dst", t1_map(&t, IOVA_DST, dst, LEN)) < 0)
		goto out;
	rep_refusal(r, "VFIO_IOMMU_MAP_DMA over a mapping", t1_map(&t, IOVA_DST, src, PAGE), EEXIST,
		    "vfio_iommu_type1.c vfio_dma_do_map: vfio_find_dma finds the range mapped");
	rep_refusal(r, "VFIO_IOMMU_MAP_DMA in the SW_MSI window", t1_map(&t, MSI_IOVA, src, PAGE), EINVAL,
		    "vfio_iommu_type1.c vfio_dma_do_map: !vfio_iommu_iova_dma_valid (a reserved region)");
	rep_dma_ok(r, "DMA src -> dst", &t.e, IOVA_SRC, IOVA_DST, src, dst, LEN);
	if (rep_call(r, "VFIO_IOMMU_UNMAP_DMA dst", t1_unmap(&t, IOVA_DST, LEN)) < 0)
		goto out;
	memset(dst, 0xA5, LEN);
	rep_dma_refused(r, "DMA into the unmapped hole", &t.e, IOVA_SRC, IOVA_DST, dst, 0xA5, LEN, EVT_F_TRANSLATION);
	rc = kmsg_find_event(c, EVT_F_TRANSLATION, t.e.sid, IOVA_DST, 5000, &ev);
	rep_step(r, "driver reports the event", rc == 0, "\"event\":%u,\"sid\":%u,\"addr\":\"0x%llx\"",
		 rc ? 0 : ev.id, rc ? 0 : ev.sid, rc ? 0ULL : (unsigned long long)ev.words[2]);
	if (rep_call(r, "VFIO_IOMMU_MAP_DMA dst again", t1_map(&t, IOVA_DST, dst, LEN)) < 0)
		goto out;
	memset(dst, 0, LEN);
	rep_dma_ok(r, "DMA after re-map", &t.e, IOVA_SRC, IOVA_DST, src, dst, LEN);
out:
	t1_close(&t);
	return r->ok;
}

/* --- check "remap": the destination moves while the engine copies --------------------- */
struct copier {
	struct engine *e;
	volatile int stop, phase; /* 0 A mapped, 1 between unmap and map, 2 B mapped */
	int done[3], failed[3], timeouts;
};

static void *copier_run(void *arg)
{
	struct copier *k = arg;

	while (!k->stop) {
		int start = k->phase;
		uint32_t st = engine_copy(k->e, IOVA_SRC, IOVA_DST, LEN);
		/* a copy counts as A's or B's only if the mapping did not change while it ran */
		int phase = start == 2 ? 2 : k->phase == 0 ? 0 : 1;

		if (st == ST_TIMEOUT)
			k->timeouts++;
		else if (st & ST_DONE)
			k->done[phase]++;
		else
			k->failed[phase]++;
	}
	return NULL;
}

static void wait_phase(struct copier *k, int phase, int n)
{
	double end = now_s() + 10;

	while (k->done[phase] + k->failed[phase] < n && now_s() < end)
		sleep_us(1000);
}

static void remap_running(struct report *r, struct t1 *t, uint8_t *dst_a, uint8_t *src, uint8_t *dst_b)
{
	struct copier k = { .e = &t->e };
	pthread_t th;
	int untouched, b_ok;

	pthread_create(&th, NULL, copier_run, &k);
	wait_phase(&k, 0, 3);
	k.phase = 1;
	rep_call(r, "VFIO_IOMMU_UNMAP_DMA A (engine running)", t1_unmap(t, IOVA_DST, LEN));
	memset(dst_a, 0xEE, LEN); /* a DMA into A after the unmap returned would overwrite it */
	wait_phase(&k, 1, 2);
	rep_call(r, "VFIO_IOMMU_MAP_DMA B at the same IOVA", t1_map(t, IOVA_DST, dst_b, LEN));
	k.phase = 2;
	wait_phase(&k, 2, 4);
	k.stop = 1;
	pthread_join(th, NULL);
	untouched = all_bytes(dst_a, LEN, 0xEE);
	b_ok = !memcmp(src, dst_b, LEN);
	rep_step(r, "nothing lands in A after its unmap", untouched && b_ok && !k.failed[0] && !k.failed[2] &&
		 k.done[2] >= 4 && !k.timeouts,
		 "\"copies_a\":%d,\"failed_a\":%d,\"copies_unmapped\":%d,\"failed_unmapped\":%d,\"copies_b\":%d,"
		 "\"failed_b\":%d,\"timeouts\":%d,\"a_untouched\":%s,\"b_data_ok\":%s", k.done[0], k.failed[0],
		 k.done[1], k.failed[1], k.done[2], k.failed[2], k.timeouts, untouched ? "true" : "false",
		 b_ok ? "true" : "false");
}

static int check_remap(struct ctx *c, struct report *r)
{
	uint8_t *src = buf_alloc(LEN), *dst_a = buf_alloc(LEN), *dst_b = buf_alloc(LEN);
	struct t1 t;

	if (t1_open(r, c->bdf, &t))
		goto out;
	fill_pattern(src, LEN, 5);
	if (rep_call(r, "VFIO_IOMMU_MAP_DMA src", t1_map(&t, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "VFIO_IOMMU_MAP_DMA A", t1_map(&t, IOVA_DST, dst_a, LEN)) < 0)
		goto out;
	rep_dma_ok(r, "DMA into A", &t.e, IOVA_SRC, IOVA_DST, src, dst_a, LEN);
	remap_running(r, &t, dst_a, src, dst_b);
	rep_refusal(r, "VFIO_GROUP_UNSET_CONTAINER with the device open", ioctl_rc(t.group, VFIO_GROUP_UNSET_CONTAINER, 0),
		    EBUSY, "vfio/group.c vfio_group_ioctl_unset_container: container_users != 1 (the device fd)");
	rep_call(r, "VFIO_IOMMU_UNMAP_DMA everything", t1_unmap(&t, IOVA_SRC, LEN) ?: t1_unmap(&t, IOVA_DST, LEN));
	memset(dst_b, 0x5A, LEN);
	rep_dma_refused(r, "DMA with nothing mapped", &t.e, IOVA_SRC, IOVA_DST, dst_b, 0x5A, LEN, EVT_F_TRANSLATION);
out:
	t1_close(&t);
	return r->ok;
}

/* --- check "coherency" --------------------------------------------------------------------- */
static int check_coherency(struct ctx *c, struct report *r)
{
	int before, after, container, g;
	struct t1 t;

	rep_field(r, "\"idr0_cohacc\":%d,\"dt_coherent\":%d", IDR0_COHACC(c->idr0), c->dt_coherent);
	if (!c->dt_coherent) {
		g = open_group(c->bdf);
		rep_step(r, "vfio-pci refuses a non-coherent IOMMU", g < 0, "\"group_file\":%s,\"source\":\"vfio_main.c "
			 "__vfio_register_dev: !IOMMU_CAP_CACHE_COHERENCY -> EINVAL (no vfio group)\"", g >= 0 ? "true" : "false");
		if (g >= 0)
			close(g);
		return r->ok;
	}
	container = open("/dev/vfio/vfio", O_RDWR);
	before = ioctl_rc(container, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU);
	rep_step(r, "VFIO_DMA_CC_IOMMU before VFIO_SET_IOMMU", before == 0, "\"value\":%d,\"source\":\"vfio_iommu_type1.c "
		 "vfio_iommu_type1_check_extension: no iommu yet -> 0\"", before);
	close(container);
	if (t1_open(r, c->bdf, &t) == 0) {
		after = ioctl_rc(t.container, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU);
		rep_step(r, "VFIO_DMA_CC_IOMMU of the container", after == 0, "\"value\":%d,\"source\":\"%s\"", after,
			 c->major >= 7 ? "7.x arm_smmu_enforce_cache_coherency needs every master CANWBS (IORT only)"
				       : "6.12 arm-smmu-v3 domain ops have no enforce_cache_coherency: "
					 "vfio_iommu_type1_attach_group leaves domain->enforce_cache_coherency false");
	}
	t1_close(&t);
	return r->ok;
}

/* --- check "group" ------------------------------------------------------------------------- */
static void group_viability(struct report *r, struct ctx *c)
{
	int g = open_group(c->bdf), st;

	rep_refusal(r, "open the group file twice", open_group(c->bdf2), EBUSY,
		    "vfio/group.c vfio_group_fops_open: group->opened_file (one opener)");
	rep_call(r, "unbind B (no driver)", pci_rebind(c->bdf2, NULL));
	st = group_status(g);
	rep_step(r, "viable with B driverless", st >= 0 && (st & VFIO_GROUP_FLAGS_VIABLE), "\"flags\":%d,\"source\":"
		 "\"vfio/group.c: VIABLE unless iommu_group_dma_owner_claimed (a kernel driver using the DMA API)\"", st);
	if (kdriver_present()) {
		rep_call(r, "bind B to " KDRIVER, pci_rebind(c->bdf2, KDRIVER));
		st = group_status(g);
		rep_step(r, "not viable with B in a kernel driver", st >= 0 && !(st & VFIO_GROUP_FLAGS_VIABLE),
			 "\"flags\":%d,\"source\":\"iommu_group_dma_owner_claimed: " KDRIVER " uses the DMA API\"", st);
		int ct = open("/dev/vfio/vfio", O_RDWR);
		rep_refusal(r, "VFIO_GROUP_SET_CONTAINER with B in a kernel driver",
			    ioctl_rc(g, VFIO_GROUP_SET_CONTAINER, (unsigned long)&ct), EPERM,
			    "iommu.c iommu_group_claim_dma_owner: owner_cnt != 0 (a DMA API user)");
		close(ct);
		rep_kdriver_copy(r, "DMA API copy by B's kernel driver");
	}
	rep_call(r, "bind B to vfio-pci again", pci_rebind(c->bdf2, "vfio-pci"));
	close(g);
}

/* everything closed: B's kernel driver gets the group's DMA API domain back */
static void group_back_to_kernel(struct report *r, struct ctx *c)
{
	char type[32];

	if (!kdriver_present()) {
		rep_field(r, "\"kernel_driver\":\"none (no " KDRIVER " module: its steps not run)\"");
		return;
	}
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
	struct engine b = { .fd = -1 };
	struct t1 t;
	int other;

	group_of(c->bdf2, group2, sizeof(group2));
	rep_step(r, "the engines share an iommu group", c->group[0] && !strcmp(c->group, group2),
		 "\"group_a\":\"%s\",\"group_b\":\"%s\"", c->group, group2);
	group_viability(r, c);
	if (t1_open(r, c->bdf, &t))
		goto out;
	other = open("/dev/vfio/vfio", O_RDWR);
	rep_refusal(r, "VFIO_GROUP_SET_CONTAINER a second container",
		    ioctl_rc(t.group, VFIO_GROUP_SET_CONTAINER, (unsigned long)&other), EINVAL,
		    "vfio/group.c vfio_group_ioctl_set_container: the group has a container already");
	close(other);
	b.fd = device_fd(&t, c->bdf2);
	b.sid = c->sid2;
	if (rep_call(r, "VFIO_GROUP_GET_DEVICE_FD B", b.fd < 0 ? b.fd : 0) < 0 ||
	    rep_call(r, "engine B BAR0 + bus master", engine_setup(&b)) < 0 ||
	    rep_call(r, "VFIO_IOMMU_MAP_DMA src", t1_map(&t, IOVA_SRC, src, LEN)) < 0 ||
	    rep_call(r, "VFIO_IOMMU_MAP_DMA dst", t1_map(&t, IOVA_DST, dst, LEN)) < 0)
		goto out;
	fill_pattern(src, LEN, 7);
	rep_dma_ok(r, "DMA by A", &t.e, IOVA_SRC, IOVA_DST, src, dst, LEN);
	fill_pattern(src, LEN, 8);
	rep_dma_ok(r, "DMA by B (the container's domain)", &b, IOVA_SRC, IOVA_DST, src, dst, LEN);
out:
	engine_close(&b, -1);
	t1_close(&t);
	group_back_to_kernel(r, c);
	return r->ok;
}

static const struct {
	const char *name;
	int (*run)(struct ctx *c, struct report *r);
	int needs_two;
} CHECKS[] = {
	{ "map", check_map, 0 },
	{ "remap", check_remap, 0 },
	{ "coherency", check_coherency, 0 },
	{ "group", check_group, 1 },
};

int main(int argc, char **argv)
{
	const char *list = NULL;
	int i, failed = 0, ran = 0;
	struct ctx c;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--checks") && i + 1 < argc)
			list = argv[++i];
		else
			return fprintf(stderr, "usage: %s [--checks LIST] BDF [BDF2]\n", argv[0]), 2;
	}
	if (i >= argc || ctx_init(&c, argv[i], i + 1 < argc ? argv[i + 1] : NULL))
		return fprintf(stderr, "usage: %s [--checks LIST] BDF [BDF2]\n", argv[0]), 2;
	for (size_t k = 0; k < sizeof(CHECKS) / sizeof(CHECKS[0]); k++) {
		struct report r;
		char mark[64];

		if (!check_wanted(list, CHECKS[k].name) || (CHECKS[k].needs_two && !c.bdf2[0]))
			continue;
		snprintf(mark, sizeof(mark), "type1-%s", CHECKS[k].name);
		rep_init(&r, mark);
		CHECKS[k].run(&c, &r);
		failed += !r.ok;
		ran++;
		rep_emit(&r);
	}
	printf(MARK "type1-summary {\"ran\":%d,\"failed\":%d,\"kernel\":\"%s\"}\n", ran, failed, c.release);
	return failed ? 1 : 0;
}
