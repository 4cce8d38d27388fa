// SPDX-License-Identifier: GPL-2.0
/*
 * viommu_dma_test - checks of the DMA test engine through its guest driver
 * (/dev/viommu-dma, guest_images/modules/viommu_dma): one machine-readable line per check,
 *     VIOMMU-MARK: <check> {json}
 * as guest_images/init.sh prints its markers.  Usage: viommu_dma_test CHECK...
 *   dma-api  DMA API copies on the RID's default domain (streaming, coherent)
 *   pasid    two kernel PASID domains (PASIDs in different CD leaf tables) beside PASID 0:
 *            attach, DMA, isolation, detach
 *   sva      SVA: the engine copies into memory the process never touched (every first
 *            touch is an I/O page fault the kernel resolves), then to an address nothing
 *            can resolve (the transaction is terminated), then a good copy again
 *   httu     the CPU's view of access / dirty state after engine DMA through SVA
 *            (smaps Referenced / Dirty), with the stalls it took
 * A copy's "stalls" counts the times the engine waited on a stalled transaction and then
 * ran the copy again; the engine issues a buffer's transactions together, so the SMMU
 * may stall (and the kernel resolve) several pages for one wait.  Exit status: 1 if any
 * check is not ok.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "viommu_dma_uapi.h"

#define KB 1024u
#define F_TRANSLATION 0x10	/* SMMUv3 event type */
#define ERR_TRANSLATION 4	/* the engine's ERR_CODE for an IOMMU refusal */

static int dev_fd = -1;
static int failures;	/* checks whose "ok" is false: the exit status */

static void mark(const char *name, const char *fmt, ...)
{
	va_list ap;

	printf("VIOMMU-MARK: %s {", name);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("}\n");
	fflush(stdout);
}

static int copy(struct viommu_dma_copy *c)
{
	return ioctl(dev_fd, VIOMMU_DMA_COPY, c) < 0 ? -errno : 0;
}

/* JSON of one copy: {"rc":..,"len":..,"status":..,"err_code":..,"event":..,"stalls":..,"mismatches":..,"us":..} */
static const char *copy_json(const struct viommu_dma_copy *c, int rc)
{
	static char buf[8][256];
	static int n;
	char *b = buf[n++ % 8];

	snprintf(b, 256, "{\"rc\":%d,\"len\":%llu,\"status\":%u,\"err_code\":%u,\"event\":%u,"
		 "\"stalls\":%u,\"mismatches\":%u,\"us\":%llu}", rc, (unsigned long long)c->len,
		 c->status, c->err_code, c->event, c->stalls, c->mismatches,
		 (unsigned long long)(c->elapsed_ns / 1000));
	return b;
}

static int faulted(const struct viommu_dma_copy *c, int rc)
{
	return rc == -EIO && c->err_code == ERR_TRANSLATION;
}

static void check_dma_api(void)
{
	static const uint64_t sizes[] = { 4 * KB, 64 * KB, 1024 * KB };
	struct viommu_dma_copy c;
	char out[2048] = "";
	int ok = 1, rc;
	size_t i;

	for (i = 0; i < 4; i++) {
		memset(&c, 0, sizeof(c));
		c.mode = i < 3 ? VIOMMU_DMA_STREAMING : VIOMMU_DMA_COHERENT;
		c.len = i < 3 ? sizes[i] : 64 * KB;
		c.seed = 100 + i;
		rc = copy(&c);
		ok &= rc == 0 && c.mismatches == 0;
		snprintf(out + strlen(out), sizeof(out) - strlen(out), "%s{\"mode\":\"%s\",\"copy\":%s}",
			 i ? "," : "", i < 3 ? "streaming" : "coherent", copy_json(&c, rc));
	}
	failures += !ok;
	mark("dma-api", "\"ok\":%s,\"copies\":[%s]", ok ? "true" : "false", out);
}

static int pasid_attach(uint32_t pasid, uint64_t iova, uint32_t npages)
{
	struct viommu_dma_pasid a = { .pasid = pasid, .npages = npages, .iova = iova };

	return ioctl(dev_fd, VIOMMU_DMA_PASID_ATTACH, &a) < 0 ? -errno : 0;
}

static int pasid_detach(uint32_t pasid)
{
	return ioctl(dev_fd, VIOMMU_DMA_PASID_DETACH, &pasid) < 0 ? -errno : 0;
}

static int pasid_copy(struct viommu_dma_copy *c, uint32_t pasid, uint64_t src, uint64_t dst,
		      uint64_t len, uint32_t seed)
{
	memset(c, 0, sizeof(*c));
	c->mode = VIOMMU_DMA_PASID_DOMAIN;
	c->pasid = pasid;
	c->src = src;
	c->dst = dst;
	c->len = len;
	c->seed = seed;
	return copy(c);
}

static void check_pasid(void)
{
	/* 1 and 1100: CD leaf tables hold 1024 CDs each, so these two are in different leaves */
	const uint32_t pa = 1, pb = 1100;
	const uint64_t ia = 0x100000, ib = 0x400000;
	struct viommu_dma_copy ca, cb, c0, iso1, iso2, gone;
	int ra, rb, r0, ri1, ri2, rg, att_a, att_b, det_a, det_b, ok;

	att_a = pasid_attach(pa, ia, 16);
	att_b = pasid_attach(pb, ib, 16);
	ra = pasid_copy(&ca, pa, ia, ia + 32 * KB, 32 * KB, 11);
	rb = pasid_copy(&cb, pb, ib, ib + 32 * KB, 32 * KB, 22);
	memset(&c0, 0, sizeof(c0));	/* PASID 0: the DMA API domain, at the same time */
	c0.mode = VIOMMU_DMA_STREAMING;
	c0.len = 64 * KB;
	c0.seed = 33;
	r0 = copy(&c0);
	ri1 = pasid_copy(&iso1, pa, ia, ib, 4 * KB, 44);	/* B's IOVA through A's PASID */
	ri2 = pasid_copy(&iso2, pb, ia, ib + 8 * KB, 4 * KB, 55);	/* A's IOVA through B's */
	det_a = pasid_detach(pa);
	rg = pasid_copy(&gone, pa, ia, ia + 4 * KB, 4 * KB, 66);	/* after the detach */
	det_b = pasid_detach(pb);
	ok = !att_a && !att_b && !ra && !ca.mismatches && !rb && !cb.mismatches && !r0 &&
	     !c0.mismatches && faulted(&iso1, ri1) && faulted(&iso2, ri2) && faulted(&gone, rg) &&
	     !det_a && !det_b;
	failures += !ok;
	mark("pasid", "\"ok\":%s,\"pasids\":[%u,%u],\"attach\":[%d,%d],\"detach\":[%d,%d],"
	     "\"copy_a\":%s,\"copy_b\":%s,\"copy_pasid0\":%s,\"a_to_b_iova\":%s,\"b_to_a_iova\":%s,"
	     "\"after_detach\":%s", ok ? "true" : "false", pa, pb, att_a, att_b, det_a, det_b,
	     copy_json(&ca, ra), copy_json(&cb, rb), copy_json(&c0, r0), copy_json(&iso1, ri1),
	     copy_json(&iso2, ri2), copy_json(&gone, rg));
}

static int sva_bind(uint32_t *pasid)
{
	return ioctl(dev_fd, VIOMMU_DMA_SVA_BIND, pasid) < 0 ? -errno : 0;
}

static int sva_copy(struct viommu_dma_copy *c, const void *src, void *dst, uint64_t len)
{
	memset(c, 0, sizeof(*c));
	c->mode = VIOMMU_DMA_SVA;
	c->src = (uintptr_t)src;
	c->dst = (uintptr_t)dst;
	c->len = len;
	return copy(c);
}

static void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

/* An anonymous mapping between two PROT_NONE guard pages, so that it stays a VMA of its
 * own (smaps reports it alone instead of merged with a neighbour). */
static void *map_isolated(size_t len)
{
	uint8_t *p = mmap(NULL, len + 8 * KB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED || mprotect(p + 4 * KB, len, PROT_READ | PROT_WRITE))
		return NULL;
	return p + 4 * KB;
}

static void fill(uint8_t *p, size_t len, unsigned seed)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (uint8_t)(seed * 131 + i * 7 + (i >> 11));
}

static void check_sva(void)
{
	const size_t len = 64 * KB;
	struct viommu_dma_copy first, bad, again;
	uint8_t *src = map_anon(len), *dst = map_anon(len), *dst2 = map_anon(16 * KB), *hole;
	uint32_t pasid = 0;
	int rb, r1, r2, r3, match1, match3, ok;

	hole = map_anon(4 * KB);	/* then unmapped: nothing can resolve a fault there */
	if (!src || !dst || !dst2 || !hole || munmap(hole, 4 * KB)) {
		failures++;
		mark("sva", "\"ok\":false,\"error\":\"mmap: %d\"", errno);
		return;
	}
	rb = sva_bind(&pasid);
	if (rb) {
		failures++;
		mark("sva", "\"ok\":false,\"bind\":%d", rb);
		return;
	}
	fill(src, len, 7);	/* src is touched; dst and dst2 never are before the DMA */
	r1 = sva_copy(&first, src, dst, len);
	match1 = !r1 && !memcmp(src, dst, len);
	r2 = sva_copy(&bad, src, hole, 4 * KB);
	r3 = sva_copy(&again, src + 16 * KB, dst2, 16 * KB);
	match3 = !r3 && !memcmp(src + 16 * KB, dst2, 16 * KB);
	ok = match1 && first.stalls > 0 && faulted(&bad, r2) && match3;
	failures += !ok;
	mark("sva", "\"ok\":%s,\"pasid\":%u,\"bind\":%d,\"first\":%s,\"first_match\":%s,"
	     "\"unresolvable\":%s,\"again\":%s,\"again_match\":%s", ok ? "true" : "false", pasid, rb,
	     copy_json(&first, r1), match1 ? "true" : "false", copy_json(&bad, r2),
	     copy_json(&again, r3), match3 ? "true" : "false");
	ioctl(dev_fd, VIOMMU_DMA_SVA_UNBIND);
}

/* A smaps line that opens a mapping: "<hex>-<hex> " */
static int smaps_header(const char *l)
{
	const char *p = l;

	while ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))
		p++;
	if (p == l || *p++ != '-')
		return 0;
	l = p;
	while ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))
		p++;
	return p != l && *p == ' ';
}

/* kB of a smaps field (e.g. "Referenced") of the mapping that starts at addr; -1 if absent */
static long smaps_kb(const void *addr, const char *field)
{
	char line[512], head[32];
	size_t flen = strlen(field);
	long kb = -1;
	int in = 0;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return -1;
	snprintf(head, sizeof(head), "%lx-", (unsigned long)(uintptr_t)addr);
	while (fgets(line, sizeof(line), f)) {
		if (smaps_header(line))
			in = !strncmp(line, head, strlen(head));
		else if (in && !strncmp(line, field, flen) && line[flen] == ':') {
			kb = strtol(line + flen + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return kb;
}

static long dirty_kb(const void *addr)
{
	return smaps_kb(addr, "Private_Dirty") + smaps_kb(addr, "Shared_Dirty");
}

static int clear_refs(void)
{
	int fd = open("/proc/self/clear_refs", O_WRONLY);
	int ok = fd >= 0 && write(fd, "1", 1) == 1;

	if (fd >= 0)
		close(fd);
	return ok ? 0 : -errno;
}

static void check_httu(void)
{
	const size_t len = 64 * KB;
	struct viommu_dma_copy acc, dirt;
	uint8_t *a = map_isolated(len), *b = map_isolated(len), *m;
	long ref0, ref1, d0, d1;
	uint32_t pasid = 0;
	int mfd, rb, rc, r1, r2, match;
	size_t i;
	volatile uint8_t sink = 0;

	mfd = memfd_create("viommu-httu", 0);
	if (!a || !b || mfd < 0 || ftruncate(mfd, len)) {
		failures++;
		mark("httu", "\"ok\":false,\"error\":\"setup: %d\"", errno);
		return;
	}
	m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	rb = sva_bind(&pasid);
	if (m == MAP_FAILED || rb) {
		failures++;
		mark("httu", "\"ok\":false,\"bind\":%d", rb);
		return;
	}
	fill(a, len, 9);
	/* Access flag: the CPU's young bits of a cleared, then the engine reads a */
	rc = clear_refs();
	memset(b, 0, len);	/* b young again (the CPU wrote it); a stays old */
	ref0 = smaps_kb(a, "Referenced");
	r1 = sva_copy(&acc, a, b, len);
	ref1 = smaps_kb(a, "Referenced");
	/* Dirty state: m's pages read by the CPU only, so its PTEs are writable-clean (DBM) */
	for (i = 0; i < len; i += 4 * KB)
		sink += m[i];
	d0 = dirty_kb(m);
	r2 = sva_copy(&dirt, a, m, len);
	d1 = dirty_kb(m);
	match = !r1 && !r2 && !memcmp(a, b, len) && !memcmp(a, m, len);
	failures += !(match && !rc && ref0 == 0 && ref1 == (long)(len / KB) && d0 == 0 &&
		      d1 == (long)(len / KB));
	mark("httu", "\"ok\":%s,\"pasid\":%u,\"clear_refs\":%d,\"access\":{\"referenced_kb_before\":%ld,"
	     "\"referenced_kb_after\":%ld,\"copy\":%s},\"dirty\":{\"dirty_kb_before\":%ld,"
	     "\"dirty_kb_after\":%ld,\"copy\":%s},\"match\":%s",
	     match && !rc && ref0 == 0 && ref1 == (long)(len / KB) && d0 == 0 && d1 == (long)(len / KB)
	     ? "true" : "false", pasid, rc, ref0, ref1, copy_json(&acc, r1), d0, d1,
	     copy_json(&dirt, r2), match ? "true" : "false");
	ioctl(dev_fd, VIOMMU_DMA_SVA_UNBIND);
	(void)sink;
}

int main(int argc, char **argv)
{
	struct viommu_dma_info info;
	int i;

	dev_fd = open("/dev/viommu-dma", O_RDWR);
	if (dev_fd < 0 || ioctl(dev_fd, VIOMMU_DMA_INFO, &info) < 0) {
		mark("viommu-dma", "\"ok\":false,\"errno\":%d", errno);
		return 1;
	}
	mark("viommu-dma", "\"ok\":true,\"version\":%u,\"pasid_bits\":%u,\"sva\":%s,\"sva_errno\":%u,"
	     "\"default_domain_type\":%u", info.version, info.pasid_bits, info.sva ? "true" : "false",
	     info.sva_errno, info.default_domain_type);
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "dma-api"))
			check_dma_api();
		else if (!strcmp(argv[i], "pasid"))
			check_pasid();
		else if (!strcmp(argv[i], "sva"))
			check_sva();
		else if (!strcmp(argv[i], "httu"))
			check_httu();
		else
			mark("error", "\"workload\":\"viommu_dma_test\",\"msg\":\"unknown check %s\"", argv[i]);
	}
	return failures ? 1 : 0;
}
