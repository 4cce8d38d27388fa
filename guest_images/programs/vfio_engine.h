/*
 * vfio_engine.h: what iommufd_test.c and vfio_type1_test.c (static guest programs, one
 * translation unit each) share: JSON result lines, the DMA test engine through a VFIO
 * device fd, iommufd / VFIO ioctl wrappers that return -errno, and the guest kernel log
 * (/dev/kmsg) reader that finds the arm-smmu-v3 driver's event reports.
 */
#ifndef VFIO_ENGINE_H
#define VFIO_ENGINE_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <linux/iommufd.h>
#include <linux/vfio.h>

#define MARK "VIOMMU-MARK: "
#define PAGE 4096UL

#include "engine_regs.h" /* the DMA test engine's registers */
#define ST_TIMEOUT 0xffffffffu /* still BUSY when the program gave up */
#define ERR_TRANSLATION 4      /* DmaErr.TRANSLATION: the IOMMU refused it */
#define EVT_F_TRANSLATION 0x10
#define EVT_ABORT 0xff         /* terminated without an event (STE abort) */

/* arm-smmu-v3.h ARM_SMMU_FEAT_* bits (same in 6.12 and 7.3) */
#define FEAT_STALL_FORCE (1u << 13)
#define FEAT_SVA (1u << 17)

/* --- SMMUv3 IDR0 fields the checks' expectations depend on (as arm-smmu-v3.h names them) */
#define IDR0_COHACC(v) (((v) >> 4) & 1)
#define IDR0_HTTU(v) (((v) >> 6) & 3)        /* 1 access flag, 2 access + dirty */
#define IDR0_STALL_MODEL(v) (((v) >> 24) & 3) /* 0 stall + terminate, 1 terminate, 2 forced stall */

/* IOMMU_GET_HW_INFO data of IOMMU_HW_INFO_TYPE_ARM_SMMUV3 (7.x uAPI layout) */
struct smmu_hw_info_v3 {
	uint32_t flags, reserved;
	uint32_t idr[6];
	uint32_t iidr, aidr;
};

/* --- one result line ------------------------------------------------------------------ */
struct report {
	const char *name; /* the marker: <program>-<check> */
	int ok;
	int nsteps;
	char steps[12288];
	size_t slen;
	char fields[4096];
	size_t flen;
};

static inline void rep_init(struct report *r, const char *name)
{
	memset(r, 0, sizeof(*r));
	r->name = name;
	r->ok = 1;
}

static inline void vappend(char *buf, size_t cap, size_t *len, const char *fmt, va_list ap)
{
	int n;

	if (*len >= cap - 1)
		return;
	n = vsnprintf(buf + *len, cap - *len, fmt, ap);
	if (n > 0)
		*len = *len + (size_t)n < cap - 1 ? *len + (size_t)n : cap - 1;
}

static inline void append(char *buf, size_t cap, size_t *len, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vappend(buf, cap, len, fmt, ap);
	va_end(ap);
}

/* one step: {"op":OP,"ok":OK[,<fmt>]}; a step that is not as expected fails the check */
static inline void rep_step(struct report *r, const char *op, int ok, const char *fmt, ...)
{
	va_list ap;

	append(r->steps, sizeof(r->steps), &r->slen, "%s{\"op\":\"%s\",\"ok\":%s", r->nsteps ? "," : "", op,
	       ok ? "true" : "false");
	if (fmt && *fmt) {
		append(r->steps, sizeof(r->steps), &r->slen, ",");
		va_start(ap, fmt);
		vappend(r->steps, sizeof(r->steps), &r->slen, fmt, ap);
		va_end(ap);
	}
	append(r->steps, sizeof(r->steps), &r->slen, "}");
	r->nsteps++;
	if (!ok)
		r->ok = 0;
}

/* top-level fields of the line (a JSON fragment without braces) */
static inline void rep_field(struct report *r, const char *fmt, ...)
{
	va_list ap;

	if (r->flen)
		append(r->fields, sizeof(r->fields), &r->flen, ",");
	va_start(ap, fmt);
	vappend(r->fields, sizeof(r->fields), &r->flen, fmt, ap);
	va_end(ap);
}

static inline void rep_emit(struct report *r)
{
	printf(MARK "%s {\"ok\":%s%s%.*s,\"steps\":[%.*s]}\n", r->name, r->ok ? "true" : "false",
	       r->flen ? "," : "", (int)r->flen, r->fields, (int)r->slen, r->steps);
	fflush(stdout);
}

/* an information line (no "ok": not a check), e.g. the environment the checks ran in */
static inline void rep_emit_info(struct report *r)
{
	printf(MARK "%s {%.*s}\n", r->name, (int)r->flen, r->fields);
	fflush(stdout);
}

static inline const char *errname(int e)
{
	switch (e) {
	case 0: return "OK";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EINTR: return "EINTR";
	case EIO: return "EIO";
	case EBADF: return "EBADF";
	case ENOMEM: return "ENOMEM";
	case EFAULT: return "EFAULT";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case ENOSPC: return "ENOSPC";
	case ERANGE: return "ERANGE";
	case ENOTTY: return "ENOTTY";
	case EOVERFLOW: return "EOVERFLOW";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EADDRINUSE: return "EADDRINUSE";
	case ETIMEDOUT: return "ETIMEDOUT";
	default: return "E?";
	}
}

/* a call that must succeed (rc 0 or positive) */
static inline int rep_call(struct report *r, const char *op, int rc)
{
	if (rc < 0)
		rep_step(r, op, 0, "\"errno\":%d,\"err\":\"%s\"", -rc, errname(-rc));
	else
		rep_step(r, op, 1, NULL);
	return rc;
}

/* a call the kernel must refuse with `want` (errno), for the reason `source` gives */
static inline void rep_refusal(struct report *r, const char *op, int rc, int want, const char *source)
{
	int e = rc < 0 ? -rc : 0;

	rep_step(r, op, e == want,
		 "\"errno\":%d,\"err\":\"%s\",\"expect\":\"%s\",\"as_source\":%s,\"source\":\"%s\"", e,
		 errname(e), errname(want), e == want ? "true" : "false", source);
}

/* whether check `name` is in the comma-separated `list` (NULL: every check) */
static inline int check_wanted(const char *list, const char *name)
{
	size_t n = strlen(name);
	const char *p = list;

	if (!list)
		return 1;
	while ((p = strstr(p, name))) {
		if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0'))
			return 1;
		p += n;
	}
	return 0;
}

static inline int all_bytes(const uint8_t *p, size_t len, uint8_t v)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != v)
			return 0;
	return 1;
}

static inline int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	close(fd);
	return n < 0 ? -errno : 0;
}

/* --- the engine's guest driver (guest_images/modules/viommu_dma): kernel DMA API user -- */
#include "viommu_dma_uapi.h"
#define KDRIVER "viommu_dma"

/* bind `bdf` to `driver` (driver_override), or leave it driverless (NULL) */
static inline int pci_rebind(const char *bdf, const char *driver)
{
	char p[160];

	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
	if (!access(p, F_OK) && write_text(p, bdf))
		return -EIO;
	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/driver_override", bdf);
	if (write_text(p, driver ? driver : "\n"))
		return -EIO;
	return driver ? write_text("/sys/bus/pci/drivers_probe", bdf) : 0;
}

/* the driver `bdf` is bound to ("" when none) */
static inline void pci_driver_of(const char *bdf, char *out, size_t cap)
{
	char p[160], link[256];
	ssize_t n;

	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/driver", bdf);
	out[0] = 0;
	if ((n = readlink(p, link, sizeof(link) - 1)) > 0) {
		link[n] = 0;
		snprintf(out, cap, "%s", strrchr(link, '/') + 1);
	}
}

static inline int kdriver_present(void)
{
	return access("/sys/bus/pci/drivers/" KDRIVER, F_OK) == 0;
}

/* a DMA API copy by the engine bound to viommu_dma (the driver fills and checks the data):
 * must complete with every byte as expected */
static inline void rep_kdriver_copy(struct report *r, const char *op)
{
	struct viommu_dma_copy cp = { .mode = VIOMMU_DMA_STREAMING, .pasid = VIOMMU_DMA_NO_PASID,
				      .len = 65536, .seed = 77 };
	int fd = open("/dev/viommu-dma", O_RDWR), rc;

	rc = fd < 0 ? -errno : ioctl(fd, VIOMMU_DMA_COPY, &cp) ? -errno : 0;
	rep_step(r, op, rc == 0 && (cp.status & ST_DONE) && !cp.mismatches,
		 "\"errno\":%d,\"status\":\"0x%x\",\"mismatches\":%u", -rc, cp.status, cp.mismatches);
	if (fd >= 0)
		close(fd);
}

/* the iommu group's domain type as sysfs says it (DMA, DMA-FQ, identity, blocked...) */
static inline void group_type(const char *group, char *out, size_t cap)
{
	char p[128];
	int fd;
	ssize_t n;

	snprintf(p, sizeof(p), "/sys/kernel/iommu_groups/%s/type", group);
	out[0] = 0;
	if ((fd = open(p, O_RDONLY)) < 0)
		return;
	n = read(fd, out, cap - 1);
	close(fd);
	out[n > 0 ? n : 0] = 0;
	out[strcspn(out, "\n")] = 0;
}

/* --- context: the devices under test and what the kernel says about them ---------------- */
struct ctx {
	char bdf[32], bdf2[32];
	unsigned sid, sid2;
	char group[64];
	char bridge[32];  /* the bridge above the engine */
	int pasid_ctrl;   /* the engine's PASID control register (-1: no capability) */
	int bridge_acs;   /* the bridge's ACS control register (-1: no capability) */
	char release[80];
	int major, minor;
	int dt_coherent; /* the arm,smmu-v3 node has dma-coherent (ARM_SMMU_FEAT_COHERENCY) */
	uint64_t smmu_base; /* the SMMU's register page (its platform device name) */
	uint32_t idr0;      /* read from the SMMU (its PCI function's BAR0) */
	uint32_t features;  /* arm-smmu-v3's ARM_SMMU_FEAT_* word (its probe line) */
	int unsafe;         /* run steps the kernel source says crash the kernel */
	int kmsg;        /* /dev/kmsg, read from where the program started */
};

struct engine {
	int fd;          /* the VFIO device (cdev, or a group's device fd for type1) */
	uint32_t devid;  /* iommufd device id after VFIO_DEVICE_BIND_IOMMUFD */
	volatile uint32_t *regs; /* BAR0 through the VFIO region mmap */
	uint64_t bar_off; /* region offset of BAR0 (pread/pwrite when regs == NULL) */
	uint64_t cfg_off; /* region offset of config space */
	unsigned sid;
};

static inline double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void sleep_us(long us)
{
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };

	nanosleep(&ts, NULL);
}

static inline unsigned bdf_sid(const char *bdf)
{
	unsigned dom, bus, dev, fn;

	if (sscanf(bdf, "%x:%x:%x.%x", &dom, &bus, &dev, &fn) != 4)
		return ~0u;
	return bus << 8 | dev << 3 | fn;
}

static inline void group_of(const char *bdf, char *out, size_t cap)
{
	char path[256], link[256];
	ssize_t n;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	n = readlink(path, link, sizeof(link) - 1);
	out[0] = 0;
	if (n > 0) {
		link[n] = 0;
		const char *name = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;

		if (strlen(name) < cap)
			strcpy(out, name);
	}
}

/* the arm,smmu-v3 platform device: its coherency as of_dma_is_coherent() finds it in the
 * DT (the node's dma-coherent / dma-noncoherent, else its parents'), and register base */
static inline int smmu_platform(uint64_t *base)
{
	DIR *d = opendir("/sys/bus/platform/devices");
	struct dirent *e;
	int coherent = 0;

	*base = 0;
	while (d && (e = readdir(d))) {
		char p[512], q[512];

		if (!strstr(e->d_name, ".smmuv3"))
			continue;
		snprintf(p, sizeof(p), "/sys/bus/platform/devices/%s/of_node/dma-coherent", e->d_name);
		snprintf(q, sizeof(q), "/sys/bus/platform/devices/%s/of_node/dma-noncoherent", e->d_name);
		coherent = access(p, F_OK) == 0 ||
			   (access(q, F_OK) != 0 && access("/sys/firmware/devicetree/base/dma-coherent", F_OK) == 0);
		*base = strtoull(e->d_name, NULL, 16);
	}
	if (d)
		closedir(d);
	return coherent;
}

/* a 32-bit SMMU register, through the sysfs resource0 mmap of the PCI function whose BAR0
 * holds the SMMU's registers (the guest kernel built from source has no /dev/mem) */
static inline uint32_t smmu_reg(uint64_t base, unsigned off)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	uint32_t v = 0;

	while (base && d && (e = readdir(d))) {
		char p[512], line[128] = "";
		FILE *f;
		int fd;
		volatile uint32_t *m;

		snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/resource", e->d_name);
		if (!(f = fopen(p, "r")))
			continue;
		if (!fgets(line, sizeof(line), f) || strtoull(line, NULL, 16) != base) {
			fclose(f);
			continue;
		}
		fclose(f);
		snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/resource0", e->d_name);
		if ((fd = open(p, O_RDWR | O_SYNC)) < 0)
			break;
		m = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
		if (m != MAP_FAILED) {
			v = m[off / 4];
			munmap((void *)m, PAGE);
		}
		close(fd);
		break;
	}
	if (d)
		closedir(d);
	return v;
}

/* the first kernel log line so far that contains `needle` (its text into `out`): 1, else 0 */
static inline int kmsg_line(const char *needle, char *out, size_t cap)
{
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);
	char rec[1024];
	int found = 0;
	ssize_t n;

	while (fd >= 0 && !found && ((n = read(fd, rec, sizeof(rec) - 1)) > 0 || (n < 0 && errno == EPIPE))) {
		char *text;

		if (n <= 0)
			continue;
		rec[n] = 0;
		text = strchr(rec, ';');
		if (!text || !strstr(text, needle))
			continue;
		found = 1;
		if (out && cap) {
			snprintf(out, cap, "%s", text + 1);
			out[strcspn(out, "\n")] = 0;
		}
	}
	if (fd >= 0)
		close(fd);
	return found;
}

static inline int kmsg_grep(const char *needle)
{
	return kmsg_line(needle, NULL, 0);
}

/* arm-smmu-v3's feature word, from its probe line "... (features 0x%08x)" (0 if absent) */
static inline uint32_t smmu_features(void)
{
	char line[512], *p;

	if (!kmsg_line("(features 0x", line, sizeof(line)) || !(p = strstr(line, "(features 0x")))
		return 0;
	return (uint32_t)strtoul(p + 10, NULL, 16);
}

/* a PCI function's config space (sysfs; 4 KiB for root) -> bytes read */
static inline int pci_config(const char *bdf, uint8_t *cfg, size_t cap)
{
	char p[256];
	int fd, n;

	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/config", bdf);
	if ((fd = open(p, O_RDONLY)) < 0)
		return 0;
	n = (int)read(fd, cfg, cap);
	close(fd);
	return n < 0 ? 0 : n;
}

/* the header type byte of `bdf` (bit 7: multi-function device), or -1 */
static inline int pci_header_type(const char *bdf)
{
	uint8_t cfg[64];

	return pci_config(bdf, cfg, sizeof(cfg)) >= 16 ? cfg[0x0e] : -1;
}

/* offset of extended capability `id` in a config space image, or 0 */
static inline unsigned pci_ext_cap(const uint8_t *cfg, int len, unsigned id)
{
	unsigned off = 0x100;

	for (int hops = 0; off && off + 4 <= (unsigned)len && hops < 64; hops++) {
		uint32_t h;

		memcpy(&h, cfg + off, 4);
		if ((h & 0xffff) == id)
			return off;
		off = h >> 20;
	}
	return 0;
}

/* the 16-bit control register (at +6) of extended capability `id` of `bdf`, or -1 */
static inline int pci_ext_ctrl(const char *bdf, unsigned id)
{
	uint8_t cfg[4096];
	int len = pci_config(bdf, cfg, sizeof(cfg));
	unsigned off = pci_ext_cap(cfg, len, id);
	uint16_t v;

	if (!off)
		return -1;
	memcpy(&v, cfg + off + 6, 2);
	return v;
}

/* the bridge above `bdf` (its parent in sysfs) */
static inline void upstream_of(const char *bdf, char *out, size_t cap)
{
	char p[256], real[512];
	char *slash;

	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s", bdf);
	out[0] = 0;
	if (!realpath(p, real) || !(slash = strrchr(real, '/')))
		return;
	*slash = 0;
	slash = strrchr(real, '/');
	if (slash && strlen(slash + 1) < cap && strchr(slash + 1, ':'))
		strcpy(out, slash + 1);
}

static inline int ctx_init(struct ctx *c, const char *bdf, const char *bdf2)
{
	struct utsname u;

	memset(c, 0, sizeof(*c));
	snprintf(c->bdf, sizeof(c->bdf), "%s", bdf);
	c->sid = bdf_sid(bdf);
	if (bdf2) {
		snprintf(c->bdf2, sizeof(c->bdf2), "%s", bdf2);
		c->sid2 = bdf_sid(bdf2);
	}
	if (c->sid == ~0u || (bdf2 && c->sid2 == ~0u))
		return fprintf(stderr, "bad BDF\n"), -1;
	group_of(bdf, c->group, sizeof(c->group));
	upstream_of(bdf, c->bridge, sizeof(c->bridge));
	c->pasid_ctrl = pci_ext_ctrl(bdf, 0x1b);                        /* PCI_EXT_CAP_ID_PASID */
	c->bridge_acs = c->bridge[0] ? pci_ext_ctrl(c->bridge, 0x0d) : -1; /* PCI_EXT_CAP_ID_ACS */
	uname(&u);
	snprintf(c->release, sizeof(c->release), "%s", u.release);
	sscanf(u.release, "%d.%d", &c->major, &c->minor);
	c->dt_coherent = smmu_platform(&c->smmu_base);
	c->idr0 = smmu_reg(c->smmu_base, 0x0);
	c->features = smmu_features();
	c->kmsg = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);
	if (c->kmsg >= 0)
		lseek(c->kmsg, 0, SEEK_END);
	return 0;
}

/* --- guest kernel log: the arm-smmu-v3 driver's "event 0xNN received:" reports -------- */
struct smmu_event {
	unsigned id, sid;
	uint64_t words[4];
	int nwords;
};

/* Wait up to timeout_ms for an event report of `id` for StreamID `sid` (and, unless
 * addr is ~0, input address `addr`).  The driver logs it (arm_smmu_evtq_thread) for every
 * event it does not hand to the iommu fault path: the id line, then the 4 raw words. */
static inline int kmsg_find_event(struct ctx *c, unsigned id, unsigned sid, uint64_t addr, int timeout_ms,
			   struct smmu_event *out)
{
	char rec[1024];
	double end = now_s() + timeout_ms / 1000.0;
	struct smmu_event cur = { 0 };
	int in_event = 0;

	if (c->kmsg < 0)
		return -ENOENT;
	while (now_s() < end) {
		ssize_t n = read(c->kmsg, rec, sizeof(rec) - 1);
		char *text, *hex;

		if (n < 0) {
			if (errno == EPIPE)
				continue; /* overwritten records: keep reading */
			sleep_us(20000);
			continue;
		}
		rec[n] = 0;
		text = strchr(rec, ';');
		if (!text || !strstr(text, "smmuv3"))
			continue;
		if ((hex = strstr(text, "event 0x"))) {
			cur = (struct smmu_event){ .id = (unsigned)strtoul(hex + 6, NULL, 16) };
			in_event = 1;
			continue;
		}
		if (!in_event || !(hex = strrchr(text, 'x')) || hex == text || hex[-1] != '0')
			continue;
		cur.words[cur.nwords++] = strtoull(hex + 1, NULL, 16);
		if (cur.nwords < 4)
			continue;
		in_event = 0;
		cur.sid = (unsigned)(cur.words[0] >> 32);
		if (cur.id == id && cur.sid == sid && (addr == ~0ull || (cur.words[2] & ~(PAGE - 1)) == (addr & ~(PAGE - 1)))) {
			if (out)
				*out = cur;
			return 0;
		}
	}
	return -ETIMEDOUT;
}

/* --- VFIO device: regions, config space, the engine ------------------------------------- */
static inline int region_info(int fd, unsigned index, struct vfio_region_info *ri)
{
	memset(ri, 0, sizeof(*ri));
	ri->argsz = sizeof(*ri);
	ri->index = index;
	return ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, ri) ? -errno : 0;
}

/* BAR0 mapped, memory decode and bus mastering on.  Returns -errno. */
static inline int engine_setup(struct engine *e)
{
	struct vfio_region_info bar, cfg;
	uint16_t cmd;
	int rc;

	if ((rc = region_info(e->fd, VFIO_PCI_BAR0_REGION_INDEX, &bar)) ||
	    (rc = region_info(e->fd, VFIO_PCI_CONFIG_REGION_INDEX, &cfg)))
		return rc;
	e->bar_off = bar.offset;
	e->cfg_off = cfg.offset;
	if (bar.flags & VFIO_REGION_INFO_FLAG_MMAP) {
		void *p = mmap(NULL, bar.size, PROT_READ | PROT_WRITE, MAP_SHARED, e->fd, (off_t)bar.offset);

		if (p != MAP_FAILED)
			e->regs = p;
	}
	if (pread(e->fd, &cmd, 2, (off_t)(e->cfg_off + 4)) != 2)
		return -errno;
	cmd |= 0x6; /* PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER */
	if (pwrite(e->fd, &cmd, 2, (off_t)(e->cfg_off + 4)) != 2)
		return -errno;
	return 0;
}

static inline uint32_t reg_rd(struct engine *e, unsigned off)
{
	uint32_t v = 0;

	if (e->regs)
		return e->regs[off / 4];
	if (pread(e->fd, &v, 4, (off_t)(e->bar_off + off)) != 4)
		return ~0u;
	return v;
}

static inline void reg_wr(struct engine *e, unsigned off, uint32_t v)
{
	if (e->regs)
		e->regs[off / 4] = v;
	else if (pwrite(e->fd, &v, 4, (off_t)(e->bar_off + off)) != 4)
		perror("engine register write");
}

/* Start a copy of len bytes from IOVA src to IOVA dst (no SubstreamID). */
static inline void engine_start(struct engine *e, uint64_t src, uint64_t dst, uint32_t len)
{
	reg_wr(e, REG_DMA_SRC, (uint32_t)src);
	reg_wr(e, REG_DMA_SRC + 4, (uint32_t)(src >> 32));
	reg_wr(e, REG_DMA_DST, (uint32_t)dst);
	reg_wr(e, REG_DMA_DST + 4, (uint32_t)(dst >> 32));
	reg_wr(e, REG_DMA_LEN, len);
	reg_wr(e, REG_DMA_SSID, 0);
	reg_wr(e, REG_DMA_CTRL, 1); /* GO, no interrupt */
}

/* DMA_STATUS once the engine is no longer busy, or ST_TIMEOUT */
static inline uint32_t engine_wait(struct engine *e, int timeout_ms)
{
	double end = now_s() + timeout_ms / 1000.0;
	long pause = 50;

	for (;;) {
		uint32_t st = reg_rd(e, REG_DMA_STATUS);

		if (!(st & ST_BUSY))
			return st;
		if (now_s() > end)
			return ST_TIMEOUT;
		sleep_us(pause);
		if (pause < 5000)
			pause *= 2;
	}
}

static inline uint32_t engine_copy(struct engine *e, uint64_t src, uint64_t dst, uint32_t len)
{
	engine_start(e, src, dst, len);
	return engine_wait(e, 5000);
}

static inline const char *status_json(uint32_t st, char *buf, size_t cap)
{
	if (st == ST_TIMEOUT)
		snprintf(buf, cap, "\"status\":\"timeout\"");
	else
		snprintf(buf, cap, "\"status\":\"0x%x\",\"done\":%s,\"error\":%s,\"stalled\":%s,\"err_code\":%u,"
			 "\"event\":%u", st, st & ST_DONE ? "true" : "false", st & ST_ERROR ? "true" : "false",
			 st & ST_STALLED ? "true" : "false", ST_ERR_CODE(st), ST_EVENT(st));
	return buf;
}

/* a copy that must complete with the destination equal to the source */
static inline int rep_dma_ok(struct report *r, const char *op, struct engine *e, uint64_t src, uint64_t dst,
		      const void *sbuf, const void *dbuf, uint32_t len)
{
	char s[200];
	uint32_t st = engine_copy(e, src, dst, len);
	int data_ok = (st & ST_DONE) && !memcmp(sbuf, dbuf, len);

	rep_step(r, op, data_ok, "%s,\"bytes\":%u,\"data_ok\":%s", status_json(st, s, sizeof(s)), len,
		 data_ok ? "true" : "false");
	return data_ok ? 0 : -1;
}

/* a copy the IOMMU must refuse (engine ERROR, ERR_CODE translation, EVENT `event`) with the
 * destination left as it was (`dbuf` still holds `fill`) */
static inline int rep_dma_refused(struct report *r, const char *op, struct engine *e, uint64_t src, uint64_t dst,
			   const uint8_t *dbuf, uint8_t fill, uint32_t len, unsigned event)
{
	char s[200];
	uint32_t st = engine_copy(e, src, dst, len);
	int untouched = 1, ok;

	for (uint32_t i = 0; i < len; i++)
		untouched &= dbuf[i] == fill;
	ok = st != ST_TIMEOUT && (st & ST_ERROR) && ST_ERR_CODE(st) == ERR_TRANSLATION &&
	     ST_EVENT(st) == event && untouched;
	rep_step(r, op, ok, "%s,\"expect_event\":%u,\"dst_untouched\":%s", status_json(st, s, sizeof(s)), event,
		 untouched ? "true" : "false");
	return ok ? 0 : -1;
}

/* --- memory ------------------------------------------------------------------------------ */
static inline uint8_t *buf_alloc(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static inline void fill_pattern(uint8_t *p, size_t len, unsigned seed)
{
	uint32_t x = seed * 2654435761u + 1;

	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		p[i] = (uint8_t)x;
	}
}

/* --- VFIO cdev + iommufd ----------------------------------------------------------------- */
static inline int cdev_open(const char *bdf)
{
	char dir[256], path[300];
	DIR *d;
	struct dirent *e;
	int fd = -ENOENT;

	snprintf(dir, sizeof(dir), "/sys/bus/pci/devices/%s/vfio-dev", bdf);
	d = opendir(dir);
	if (!d)
		return -errno;
	while ((e = readdir(d))) {
		if (strncmp(e->d_name, "vfio", 4))
			continue;
		snprintf(path, sizeof(path), "/dev/vfio/devices/%s", e->d_name);
		fd = open(path, O_RDWR);
		fd = fd < 0 ? -errno : fd;
		break;
	}
	closedir(d);
	return fd;
}

static inline int vfio_bind(struct engine *e, int iommufd)
{
	struct vfio_device_bind_iommufd b = { .argsz = sizeof(b), .iommufd = iommufd };

	if (ioctl(e->fd, VFIO_DEVICE_BIND_IOMMUFD, &b))
		return -errno;
	e->devid = b.out_devid;
	return 0;
}

static inline int vfio_attach(struct engine *e, uint32_t pt_id)
{
	struct vfio_device_attach_iommufd_pt a = { .argsz = sizeof(a), .pt_id = pt_id };

	return ioctl(e->fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a) ? -errno : (int)a.pt_id;
}

static inline int vfio_detach(struct engine *e)
{
	struct vfio_device_detach_iommufd_pt d = { .argsz = sizeof(d) };

	return ioctl(e->fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &d) ? -errno : 0;
}

static inline int ioas_alloc(int ifd, uint32_t *id)
{
	struct iommu_ioas_alloc a = { .size = sizeof(a) };

	if (ioctl(ifd, IOMMU_IOAS_ALLOC, &a))
		return -errno;
	*id = a.out_ioas_id;
	return 0;
}

static inline int ioas_map(int ifd, uint32_t ioas, uint64_t iova, void *p, uint64_t len)
{
	struct iommu_ioas_map m = {
		.size = sizeof(m), .ioas_id = ioas, .user_va = (uintptr_t)p, .length = len, .iova = iova,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};

	return ioctl(ifd, IOMMU_IOAS_MAP, &m) ? -errno : 0;
}

static inline int ioas_unmap(int ifd, uint32_t ioas, uint64_t iova, uint64_t len)
{
	struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .iova = iova, .length = len };

	return ioctl(ifd, IOMMU_IOAS_UNMAP, &u) ? -errno : 0;
}

static inline int ioas_copy(int ifd, uint32_t dst_ioas, uint32_t src_ioas, uint64_t src_iova, uint64_t dst_iova,
		     uint64_t len)
{
	struct iommu_ioas_copy c = {
		.size = sizeof(c), .dst_ioas_id = dst_ioas, .src_ioas_id = src_ioas, .length = len,
		.dst_iova = dst_iova, .src_iova = src_iova,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};

	return ioctl(ifd, IOMMU_IOAS_COPY, &c) ? -errno : 0;
}

static inline int hwpt_alloc(int ifd, uint32_t devid, uint32_t pt, uint32_t flags, uint32_t fault_id, uint32_t *out)
{
	struct iommu_hwpt_alloc a = {
		.size = sizeof(a), .flags = flags, .dev_id = devid, .pt_id = pt, .fault_id = fault_id,
	};

	if (ioctl(ifd, IOMMU_HWPT_ALLOC, &a))
		return -errno;
	*out = a.out_hwpt_id;
	return 0;
}

static inline int obj_destroy(int ifd, uint32_t id)
{
	struct iommu_destroy d = { .size = sizeof(d), .id = id };

	return ioctl(ifd, IOMMU_DESTROY, &d) ? -errno : 0;
}

static inline int ioctl_rc(int fd, unsigned long cmd, unsigned long arg)
{
	int rc = ioctl(fd, cmd, arg);

	return rc < 0 ? -errno : rc;
}

static inline int fault_queue_alloc(int ifd, uint32_t *id, int *fd)
{
	struct iommu_fault_alloc a = { .size = sizeof(a) };

	if (ioctl(ifd, IOMMU_FAULT_QUEUE_ALLOC, &a))
		return -errno;
	*id = a.out_fault_id;
	*fd = (int)a.out_fault_fd;
	return 0;
}

/* one fault record from the fault fd within timeout_ms: 0, or -ETIMEDOUT / -errno */
static inline int fault_read(int fd, struct iommu_hwpt_pgfault *f, int timeout_ms)
{
	double end = now_s() + timeout_ms / 1000.0;

	while (now_s() < end) {
		ssize_t n = read(fd, f, sizeof(*f));

		if (n == (ssize_t)sizeof(*f))
			return 0;
		if (n < 0 && errno != EAGAIN)
			return -errno;
		sleep_us(5000);
	}
	return -ETIMEDOUT;
}

static inline int fault_respond(int fd, uint32_t cookie, uint32_t code)
{
	struct iommu_hwpt_page_response resp = { .cookie = cookie, .code = code };
	ssize_t n = write(fd, &resp, sizeof(resp));

	return n == (ssize_t)sizeof(resp) ? 0 : n < 0 ? -errno : -EIO;
}

static inline int dirty_tracking(int ifd, uint32_t hwpt, int enable)
{
	struct iommu_hwpt_set_dirty_tracking d = {
		.size = sizeof(d), .hwpt_id = hwpt, .flags = enable ? IOMMU_HWPT_DIRTY_TRACKING_ENABLE : 0,
	};

	return ioctl(ifd, IOMMU_HWPT_SET_DIRTY_TRACKING, &d) ? -errno : 0;
}

/* the dirty bitmap of [iova, iova + 64 pages): bit i = page i */
static inline int dirty_bitmap(int ifd, uint32_t hwpt, uint64_t iova, unsigned pages, uint32_t flags, uint64_t *bits)
{
	struct iommu_hwpt_get_dirty_bitmap g = {
		.size = sizeof(g), .hwpt_id = hwpt, .flags = flags, .iova = iova, .length = pages * PAGE,
		.page_size = PAGE, .data = (uintptr_t)bits,
	};

	*bits = 0;
	return ioctl(ifd, IOMMU_HWPT_GET_DIRTY_BITMAP, &g) ? -errno : 0;
}

/* A cdev engine bound to a new iommufd, BAR0 mapped, bus master on.  Returns -errno and
 * records the steps. */
static inline int engine_open_iommufd(struct report *r, const char *bdf, struct engine *e, int *ifd)
{
	memset(e, 0, sizeof(*e));
	e->sid = bdf_sid(bdf);
	*ifd = open("/dev/iommu", O_RDWR);
	if (rep_call(r, "open /dev/iommu", *ifd < 0 ? -errno : 0) < 0)
		return -1;
	e->fd = cdev_open(bdf);
	if (rep_call(r, "open vfio cdev", e->fd < 0 ? e->fd : 0) < 0)
		return -1;
	if (rep_call(r, "VFIO_DEVICE_BIND_IOMMUFD", vfio_bind(e, *ifd)) < 0)
		return -1;
	if (rep_call(r, "engine BAR0 + bus master", engine_setup(e)) < 0)
		return -1;
	if (reg_rd(e, REG_MAGIC) != ENG_MAGIC) {
		rep_step(r, "engine MAGIC", 0, "\"read\":\"0x%x\"", reg_rd(e, REG_MAGIC));
		return -1;
	}
	return 0;
}

static inline void engine_close(struct engine *e, int ifd)
{
	if (e->regs)
		munmap((void *)e->regs, PAGE);
	if (e->fd >= 0)
		close(e->fd);
	if (ifd >= 0)
		close(ifd);
	e->regs = NULL;
	e->fd = -1;
}

#endif
