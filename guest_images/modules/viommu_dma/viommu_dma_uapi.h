/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * viommu_dma: the user interface of the guest driver for viommu-backend's DMA test
 * engine (PCI 5555:0001), /dev/viommu-dma.  Shared by the module and the guest test
 * program guest_images/programs/viommu_dma_test.c.
 */
#ifndef VIOMMU_DMA_UAPI_H
#define VIOMMU_DMA_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VIOMMU_DMA_NO_PASID	0xffffffffu

/* How a copy's addresses are made. */
enum viommu_dma_mode {
	VIOMMU_DMA_STREAMING = 1,	/* kernel buffers, dma_map_single (DMA API, PASID 0) */
	VIOMMU_DMA_COHERENT = 2,	/* kernel buffers, dma_alloc_coherent (DMA API, PASID 0) */
	VIOMMU_DMA_PASID_DOMAIN = 3,	/* IOVAs of a kernel PASID domain (VIOMMU_DMA_PASID_ATTACH) */
	VIOMMU_DMA_SVA = 4,		/* the caller's virtual addresses, its SVA PASID */
};

/* VIOMMU_DMA_COPY: the engine copies len bytes from src to dst and interrupts. */
struct viommu_dma_copy {
	__u32 mode;		/* enum viommu_dma_mode */
	__u32 pasid;		/* PASID_DOMAIN: the domain's PASID (or another one, to test isolation) */
	__u64 src;		/* PASID_DOMAIN: IOVA; SVA: user VA; DMA API modes: ignored */
	__u64 dst;
	__u64 len;		/* at most 1 MiB */
	__u32 seed;		/* DMA API / PASID_DOMAIN: the driver fills the source from this seed */
	/* out */
	__u32 status;		/* the engine's DMA_STATUS at completion */
	__u32 err_code;		/* DMA_STATUS.ERR_CODE (4: translation fault) */
	__u32 event;		/* DMA_STATUS.EVENT: SMMUv3 event type of the fault */
	__u32 stalls;		/* stalls the engine waited on during this copy */
	__u32 mismatches;	/* DMA API / PASID_DOMAIN: bytes of the destination not as expected */
	__u64 elapsed_ns;
};

/* VIOMMU_DMA_PASID_ATTACH: a new paging domain attached at pasid; npages kernel pages
 * mapped read/write at iova (4 KiB each, contiguous IOVAs). */
struct viommu_dma_pasid {
	__u32 pasid;
	__u32 npages;		/* at most 256 */
	__u64 iova;
};

struct viommu_dma_info {
	__u32 version;		/* the engine's VERSION register */
	__u32 pasid_bits;	/* 0 when the device has no PASID support enabled */
	__u32 sva;		/* SVA could be enabled (stalls / PRI for I/O page faults) */
	__u32 sva_errno;	/* why not (positive errno) */
	__u32 default_domain_type; /* IOMMU_DOMAIN_* of the RID's domain */
	__u32 pad;
};

#define VIOMMU_DMA_MAGIC	'v'
#define VIOMMU_DMA_INFO		_IOR(VIOMMU_DMA_MAGIC, 0, struct viommu_dma_info)
#define VIOMMU_DMA_COPY		_IOWR(VIOMMU_DMA_MAGIC, 1, struct viommu_dma_copy)
#define VIOMMU_DMA_PASID_ATTACH	_IOW(VIOMMU_DMA_MAGIC, 2, struct viommu_dma_pasid)
#define VIOMMU_DMA_PASID_DETACH	_IOW(VIOMMU_DMA_MAGIC, 3, __u32)
#define VIOMMU_DMA_SVA_BIND	_IOR(VIOMMU_DMA_MAGIC, 4, __u32)	/* returns the PASID */
#define VIOMMU_DMA_SVA_UNBIND	_IO(VIOMMU_DMA_MAGIC, 5)

#endif
