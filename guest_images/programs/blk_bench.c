// SPDX-License-Identifier: GPL-2.0
/*
 * blk_bench - O_DIRECT write + read back + compare on a block device, from one guest
 * buffer of a fixed physical layout, used for every request of the run:
 *     blk_bench DEV BS BYTES LAYOUT [SEED]
 *   LAYOUT contiguous  BS bytes of physically contiguous memory (a transparent huge page:
 *                      a 2 MiB-aligned mapping with MADV_HUGEPAGE), one iovec
 *          scattered   BS / 4 KiB separate pages, no two physically adjacent (picked from
 *                      a shuffled pool of small pages), one iovec per page
 * BYTES / BS requests are written from offset 0 of DEV, then read back into the same
 * buffer and compared: every 4 KiB page of a request carries its request and page number
 * and the seed (poisoned before each read), the rest of it a fixed pseudo-random pattern.
 * The layout is checked through /proc/self/pagemap (root: PFNs) before and after the I/O:
 * "runs" counts the physically contiguous runs of the buffer's pages in request order.
 * Only the pwritev / preadv calls are timed.  One line on stdout, as init.sh's markers:
 *     VIOMMU-MARK: blk-bench {"bs":..,"layout":..,"runs":..,"layout_ok":..,"write_ns":..,...}
 * Exit status: 0 when the layout held and every page read back as written, 1 otherwise,
 * 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define HUGE (2u << 20)
#define POOL_FACTOR 4		/* scattered: pool pages per page wanted */
#define PFN_MASK ((1ull << 55) - 1)
#define PRESENT (1ull << 63)
#define STAMP_WORDS 3		/* request, page, seed at the start of every page */

struct buffer {
	const char *layout;
	size_t npages;
	struct iovec *iov;	/* contiguous: 1 entry of BS bytes; scattered: one per page */
	int niov;
	char **page;		/* npages page addresses, in request order */
	uint64_t *pfn;		/* their frames at the start */
	char err[160];
};

static uint64_t rng_state;

static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The frame of the page at p (0: not present or not visible). */
static uint64_t pfn_of(int pagemap, const void *p)
{
	uint64_t e = 0;
	off_t off = (off_t)((uintptr_t)p / PAGE) * 8;

	if (pread(pagemap, &e, sizeof(e), off) != sizeof(e) || !(e & PRESENT))
		return 0;
	return e & PFN_MASK;
}

/* Physically contiguous runs of pfn[0..n) in order. */
static size_t runs(const uint64_t *pfn, size_t n)
{
	size_t r = n ? 1 : 0;

	for (size_t k = 1; k < n; k++)
		r += pfn[k] != pfn[k - 1] + 1;
	return r;
}

static int frames(int pagemap, struct buffer *b, uint64_t *out)
{
	for (size_t k = 0; k < b->npages; k++) {
		out[k] = pfn_of(pagemap, b->page[k]);
		if (!out[k]) {
			snprintf(b->err, sizeof(b->err), "no frame for page %zu in pagemap (not root?)", k);
			return -1;
		}
	}
	return 0;
}

static void *map_pages(size_t len, int advice)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	madvise(p, len, advice);
	return p;
}

static int contiguous(struct buffer *b, size_t bs)
{
	char *raw, *base;

	if (bs > HUGE)
		return snprintf(b->err, sizeof(b->err), "contiguous: at most %u bytes", HUGE), -1;
	raw = map_pages(2 * HUGE, MADV_HUGEPAGE);
	if (!raw)
		return snprintf(b->err, sizeof(b->err), "mmap: %s", strerror(errno)), -1;
	base = (char *)(((uintptr_t)raw + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
	madvise(base, HUGE, MADV_HUGEPAGE);
	memset(base, 0, HUGE);	/* one fault: the huge page */
	for (size_t k = 0; k < b->npages; k++)
		b->page[k] = base + k * PAGE;
	b->iov[0] = (struct iovec){ base, bs };
	b->niov = 1;
	return 0;
}

static int adjacent_to_any(uint64_t f, const uint64_t *taken, size_t n)
{
	for (size_t k = 0; k < n; k++)
		if (f + 1 == taken[k] || taken[k] + 1 == f || f == taken[k])
			return 1;
	return 0;
}

static int scattered(struct buffer *b, int pagemap)
{
	size_t pool = POOL_FACTOR * b->npages, got = 0;
	char *p = map_pages(pool * PAGE, MADV_NOHUGEPAGE);
	size_t *order = calloc(pool, sizeof(*order));

	if (!p || !order)
		return snprintf(b->err, sizeof(b->err), "pool of %zu pages: %s", pool, strerror(errno)), -1;
	for (size_t k = 0; k < pool; k++) {
		p[k * PAGE] = 1;
		order[k] = k;
	}
	for (size_t k = pool - 1; k > 0; k--) {	/* shuffle the pool */
		size_t j = rng() % (k + 1), t = order[k];

		order[k] = order[j];
		order[j] = t;
	}
	for (size_t k = 0; k < pool && got < b->npages; k++) {
		char *page = p + order[k] * PAGE;
		uint64_t f = pfn_of(pagemap, page);

		if (f && !adjacent_to_any(f, b->pfn, got)) {
			b->pfn[got] = f;
			b->page[got] = page;
			b->iov[got] = (struct iovec){ page, PAGE };
			got++;
		}
	}
	free(order);
	if (got < b->npages)
		return snprintf(b->err, sizeof(b->err), "only %zu of %zu pages apart in a pool of %zu",
				got, b->npages, pool), -1;
	b->niov = (int)got;
	return 0;
}

static int build(struct buffer *b, size_t bs, int pagemap)
{
	b->npages = bs / PAGE;
	b->iov = calloc(b->npages, sizeof(*b->iov));
	b->page = calloc(b->npages, sizeof(*b->page));
	b->pfn = calloc(b->npages, sizeof(*b->pfn));
	if (!b->iov || !b->page || !b->pfn)
		return snprintf(b->err, sizeof(b->err), "out of memory"), -1;
	if (!strcmp(b->layout, "contiguous") ? contiguous(b, bs) : scattered(b, pagemap))
		return -1;
	for (size_t k = 0; k < b->npages; k++)
		mlock(b->page[k], PAGE);
	return frames(pagemap, b, b->pfn);
}

static void stamp(char *page, uint64_t req, uint64_t pg, uint64_t seed)
{
	uint64_t w[STAMP_WORDS] = { req, pg, seed };

	memcpy(page, w, sizeof(w));
}

static int page_ok(const char *page, const char *ref, uint64_t req, uint64_t pg, uint64_t seed)
{
	uint64_t w[STAMP_WORDS] = { req, pg, seed };

	return !memcmp(page, w, sizeof(w)) && !memcmp(page + sizeof(w), ref + sizeof(w), PAGE - sizeof(w));
}

struct result {
	uint64_t write_ns, read_ns, mismatched_pages;
	char err[160];
};

static int io(int fd, struct buffer *b, int write, size_t bs, uint64_t i, struct result *r)
{
	uint64_t t0 = now_ns();
	ssize_t n = write ? pwritev(fd, b->iov, b->niov, (off_t)(i * bs))
			  : preadv(fd, b->iov, b->niov, (off_t)(i * bs));
	uint64_t t = now_ns() - t0;

	*(write ? &r->write_ns : &r->read_ns) += t;
	if (n == (ssize_t)bs)
		return 0;
	snprintf(r->err, sizeof(r->err), "%s request %" PRIu64 ": %s", write ? "write" : "read", i,
		 n < 0 ? strerror(errno) : "short transfer");
	return -1;
}

static int run(int fd, struct buffer *b, size_t bs, uint64_t nreq, uint64_t seed, struct result *r)
{
	char *ref = malloc(b->npages * PAGE);
	uint64_t poison[STAMP_WORDS];

	if (!ref)
		return snprintf(r->err, sizeof(r->err), "out of memory"), -1;
	memset(poison, 0xff, sizeof(poison));
	for (size_t k = 0; k < b->npages * PAGE / 8; k++)
		((uint64_t *)ref)[k] = rng();
	for (size_t k = 0; k < b->npages; k++)
		memcpy(b->page[k], ref + k * PAGE, PAGE);
	for (uint64_t i = 0; i < nreq; i++) {
		for (size_t k = 0; k < b->npages; k++)
			stamp(b->page[k], i, k, seed);
		if (io(fd, b, 1, bs, i, r))
			return -1;
	}
	for (uint64_t i = 0; i < nreq; i++) {
		for (size_t k = 0; k < b->npages; k++)
			memcpy(b->page[k], poison, sizeof(poison));
		if (io(fd, b, 0, bs, i, r))
			return -1;
		for (size_t k = 0; k < b->npages; k++)
			r->mismatched_pages += !page_ok(b->page[k], ref + k * PAGE, i, k, seed);
	}
	free(ref);
	return 0;
}

static double mbps(uint64_t bytes, uint64_t ns)
{
	return ns ? bytes * 1e3 / ns : 0.0;
}

int main(int argc, char **argv)
{
	struct buffer b = { 0 };
	struct result r = { 0 };
	size_t bs, nruns = 0, nruns_after = 0, moved = 0;
	uint64_t bytes, nreq, seed;
	int fd, pagemap, layout_ok = 0, ok;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 5 || (strcmp(argv[4], "contiguous") && strcmp(argv[4], "scattered")))
		return fprintf(stderr, "usage: %s DEV BS BYTES contiguous|scattered [SEED]\n", argv[0]), 2;
	bs = strtoull(argv[2], NULL, 0);
	bytes = strtoull(argv[3], NULL, 0);
	seed = argc > 5 ? strtoull(argv[5], NULL, 0) : 1;
	if (!bs || bs % PAGE || bytes < bs)
		return fprintf(stderr, "%s: BS a multiple of %u, BYTES >= BS\n", argv[0], PAGE), 2;
	nreq = bytes / bs;
	rng_state = seed * 0x9E3779B97F4A7C15ull | 1;
	b.layout = argv[4];
	fd = open(argv[1], O_RDWR | O_DIRECT);
	pagemap = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0 || pagemap < 0)
		snprintf(b.err, sizeof(b.err), "open %s: %s", fd < 0 ? argv[1] : "pagemap", strerror(errno));
	else if (!build(&b, bs, pagemap)) {
		uint64_t *after = calloc(b.npages, sizeof(*after));

		nruns = runs(b.pfn, b.npages);
		layout_ok = nruns == (!strcmp(b.layout, "contiguous") ? 1 : b.npages);
		if (!layout_ok)
			snprintf(b.err, sizeof(b.err), "%zu physically contiguous runs: not %s", nruns,
				 b.layout);
		if (layout_ok && !run(fd, &b, bs, nreq, seed, &r) && after && !frames(pagemap, &b, after)) {
			nruns_after = runs(after, b.npages);
			for (size_t k = 0; k < b.npages; k++)
				moved += after[k] != b.pfn[k];
			layout_ok = !moved;
			if (moved)
				snprintf(b.err, sizeof(b.err), "%zu pages moved during the run", moved);
		}
	}
	ok = layout_ok && !b.err[0] && !r.err[0] && !r.mismatched_pages;
	printf("VIOMMU-MARK: blk-bench {\"ok\":%s,\"dev\":\"%s\",\"bs\":%zu,\"bytes\":%" PRIu64
	       ",\"requests\":%" PRIu64 ",\"layout\":\"%s\",\"pages\":%zu,\"iovecs\":%d,\"runs\":%zu,"
	       "\"runs_after\":%zu,\"moved_pages\":%zu,\"layout_ok\":%s,\"write_ns\":%" PRIu64
	       ",\"read_ns\":%" PRIu64 ",\"write_mbps\":%.2f,\"read_mbps\":%.2f,\"mbps\":%.2f,"
	       "\"mismatched_pages\":%" PRIu64 ",\"error\":\"%s%s\"}\n",
	       ok ? "true" : "false", argv[1], bs, nreq * bs, nreq, b.layout, b.npages, b.niov, nruns,
	       nruns_after, moved, layout_ok ? "true" : "false", r.write_ns, r.read_ns,
	       mbps(nreq * bs, r.write_ns), mbps(nreq * bs, r.read_ns),
	       mbps(2 * nreq * bs, r.write_ns + r.read_ns), r.mismatched_pages, b.err, r.err);
	return ok ? 0 : 1;
}
