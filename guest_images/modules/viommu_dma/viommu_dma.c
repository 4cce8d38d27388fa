// SPDX-License-Identifier: GPL-2.0
/*
 * viommu_dma - guest driver for viommu-backend's DMA test engine (PCI 5555:0001; its
 * register table is in viommu_backend/endpoints/testdev.py).
 *
 * /dev/viommu-dma lets a test program run copies through the engine, each completed by
 * the engine's interrupt (INTx: MSIs of devices behind the emulated SMMU are not
 * translated by QEMU), in four ways:
 *   - the DMA API on the RID's default domain: streaming (dma_map_single) and coherent
 *     (dma_alloc_coherent) kernel buffers, filled and checked here;
 *   - kernel PASID domains: a paging domain per PASID (iommu_attach_device_pasid), pages
 *     mapped with iommu_map, the engine tagging its transactions with the PASID;
 *   - SVA: iommu_sva_bind_device() on the caller's mm, the engine copying between the
 *     caller's virtual addresses, I/O page faults resolved by the kernel (stalls).
 * See viommu_dma_uapi.h for the ioctls.
 */
#include <linux/completion.h>
#include <linux/dma-mapping.h>
#include <linux/highmem.h>
#include <linux/interrupt.h>
#include <linux/iommu.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/pci-ats.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#include "viommu_dma_uapi.h"

#define REG_VERSION	0x04
#define REG_IRQ_STATUS	0x10
#define REG_DMA_SRC	0x18
#define REG_DMA_DST	0x20
#define REG_DMA_LEN	0x28
#define REG_DMA_CTRL	0x2c
#define REG_DMA_STATUS	0x30
#define REG_DMA_SSID	0x38
#define REG_DMA_STALLS	0x3c
#define CTRL_GO		BIT(0)
#define CTRL_IRQ	BIT(1)
#define STATUS_ERROR	BIT(2)
#define IRQ_DMA_DONE	BIT(1)
#define SSID_VALID	BIT(31)
#define MAX_LEN		SZ_1M
#define MAX_DOMAINS	4
#define MAX_PAGES	256
#define COPY_TIMEOUT_MS	30000

struct vdma_domain {
	u32 pasid;
	u32 npages;
	u64 iova;
	struct iommu_domain *domain;
	struct page **pages;
};

struct vdma {
	struct pci_dev *pdev;
	void __iomem *regs;
	struct miscdevice misc;
	struct mutex lock;		/* one copy at a time; the PASID domains */
	struct completion done;
	struct vdma_domain dom[MAX_DOMAINS];
	int sva_errno;			/* 0: SVA (with I/O page faults) enabled */
};

struct vdma_file {
	struct vdma *v;
	struct iommu_sva *sva;
};

static struct vdma *vdma_dev;	/* the one engine this driver serves */

static u8 vdma_pattern(u32 seed, u64 i)
{
	return (u8)((seed * 2654435761u) >> 24) ^ (u8)(i * 7 + (i >> 9));
}

static irqreturn_t vdma_irq(int irq, void *data)
{
	struct vdma *v = data;
	u32 s = readl(v->regs + REG_IRQ_STATUS);

	if (!s)
		return IRQ_NONE;
	writel(s, v->regs + REG_IRQ_STATUS);
	if (s & IRQ_DMA_DONE)
		complete(&v->done);
	return IRQ_HANDLED;
}

static void vdma_write64(struct vdma *v, u32 reg, u64 val)
{
	writel(lower_32_bits(val), v->regs + reg);
	writel(upper_32_bits(val), v->regs + reg + 4);
}

/* Run one copy; the result is in *c. 0, -EIO (the engine reported an error) or -ETIMEDOUT. */
static int vdma_run(struct vdma *v, u64 src, u64 dst, u32 pasid, struct viommu_dma_copy *c)
{
	u32 stalls = readl(v->regs + REG_DMA_STALLS);
	ktime_t t0 = ktime_get();
	u32 st;

	reinit_completion(&v->done);
	vdma_write64(v, REG_DMA_SRC, src);
	vdma_write64(v, REG_DMA_DST, dst);
	writel(c->len, v->regs + REG_DMA_LEN);
	writel(pasid == VIOMMU_DMA_NO_PASID ? 0 : (pasid | SSID_VALID), v->regs + REG_DMA_SSID);
	writel(CTRL_GO | CTRL_IRQ, v->regs + REG_DMA_CTRL);
	if (!wait_for_completion_timeout(&v->done, msecs_to_jiffies(COPY_TIMEOUT_MS)))
		return -ETIMEDOUT;
	st = readl(v->regs + REG_DMA_STATUS);
	c->status = st;
	c->err_code = (st >> 8) & 0xff;
	c->event = (st >> 16) & 0xff;
	c->stalls = readl(v->regs + REG_DMA_STALLS) - stalls;
	c->elapsed_ns = ktime_to_ns(ktime_sub(ktime_get(), t0));
	return (st & STATUS_ERROR) ? -EIO : 0;
}

static u32 vdma_check(const u8 *buf, u64 len, u32 seed)
{
	u32 bad = 0;
	u64 i;

	for (i = 0; i < len; i++)
		bad += buf[i] != vdma_pattern(seed, i);
	return bad;
}

static int vdma_copy_dma_api(struct vdma *v, struct viommu_dma_copy *c)
{
	struct device *dev = &v->pdev->dev;
	dma_addr_t s_dma, d_dma;
	u8 *s, *d;
	int ret = -ENOMEM;
	u64 i;

	if (c->mode == VIOMMU_DMA_COHERENT) {
		s = dma_alloc_coherent(dev, c->len, &s_dma, GFP_KERNEL);
		d = dma_alloc_coherent(dev, c->len, &d_dma, GFP_KERNEL);
	} else {
		s = kmalloc(c->len, GFP_KERNEL);
		d = kzalloc(c->len, GFP_KERNEL);
	}
	if (!s || !d)
		goto out;
	for (i = 0; i < c->len; i++)
		s[i] = vdma_pattern(c->seed, i);
	memset(d, 0, c->len);
	if (c->mode == VIOMMU_DMA_STREAMING) {
		s_dma = dma_map_single(dev, s, c->len, DMA_TO_DEVICE);
		if (dma_mapping_error(dev, s_dma))
			goto out;
		d_dma = dma_map_single(dev, d, c->len, DMA_FROM_DEVICE);
		if (dma_mapping_error(dev, d_dma)) {
			dma_unmap_single(dev, s_dma, c->len, DMA_TO_DEVICE);
			goto out;
		}
	}
	ret = vdma_run(v, s_dma, d_dma, VIOMMU_DMA_NO_PASID, c);
	if (c->mode == VIOMMU_DMA_STREAMING) {
		dma_unmap_single(dev, s_dma, c->len, DMA_TO_DEVICE);
		dma_unmap_single(dev, d_dma, c->len, DMA_FROM_DEVICE);
	}
	if (!ret)
		c->mismatches = vdma_check(d, c->len, c->seed);
out:
	if (c->mode == VIOMMU_DMA_COHERENT) {
		if (s)
			dma_free_coherent(dev, c->len, s, s_dma);
		if (d)
			dma_free_coherent(dev, c->len, d, d_dma);
	} else {
		kfree(s);
		kfree(d);
	}
	return ret;
}

static struct vdma_domain *vdma_domain_of(struct vdma *v, u32 pasid)
{
	int i;

	for (i = 0; i < MAX_DOMAINS; i++)
		if (v->dom[i].domain && v->dom[i].pasid == pasid)
			return &v->dom[i];
	return NULL;
}

/* Byte access to [iova, iova + len) of a PASID domain's pages: fill (seed) or check. */
static int vdma_domain_bytes(struct vdma_domain *d, u64 iova, u64 len, u32 seed, bool fill,
			     u32 *bad)
{
	u64 i;

	if (iova < d->iova || iova + len > d->iova + (u64)d->npages * PAGE_SIZE)
		return -EINVAL;
	for (i = 0; i < len; i++) {
		u64 off = iova - d->iova + i;
		u8 *p = kmap_local_page(d->pages[off >> PAGE_SHIFT]);

		if (fill)
			p[off & ~PAGE_MASK] = vdma_pattern(seed, i);
		else
			*bad += p[off & ~PAGE_MASK] != vdma_pattern(seed, i);
		kunmap_local(p);
	}
	return 0;
}

static int vdma_copy_pasid(struct vdma *v, struct viommu_dma_copy *c)
{
	struct vdma_domain *d = vdma_domain_of(v, c->pasid);
	bool check;
	int ret;

	/* the source is filled in the domain of c->pasid when it is there; a copy with a
	 * PASID whose domain does not map src/dst shows isolation (a translation fault) */
	if (d && vdma_domain_bytes(d, c->src, c->len, c->seed, true, NULL) == 0)
		check = c->dst >= d->iova && c->dst + c->len <= d->iova + (u64)d->npages * PAGE_SIZE;
	else
		check = false;
	if (check)
		vdma_domain_bytes(d, c->dst, c->len, 0, true, NULL);	/* a known non-pattern */
	ret = vdma_run(v, c->src, c->dst, c->pasid, c);
	if (!ret && check)
		vdma_domain_bytes(d, c->dst, c->len, c->seed, false, &c->mismatches);
	return ret;
}

static void vdma_domain_free(struct vdma *v, struct vdma_domain *d)
{
	u32 i;

	iommu_detach_device_pasid(d->domain, &v->pdev->dev, d->pasid);
	for (i = 0; i < d->npages && d->pages[i]; i++) {
		iommu_unmap(d->domain, d->iova + (u64)i * PAGE_SIZE, PAGE_SIZE);
		__free_page(d->pages[i]);
	}
	kfree(d->pages);
	iommu_domain_free(d->domain);
	memset(d, 0, sizeof(*d));
}

static int vdma_pasid_attach(struct vdma *v, struct viommu_dma_pasid *a)
{
	struct device *dev = &v->pdev->dev;
	struct vdma_domain *d = NULL;
	u32 i;
	int ret;

	if (!a->npages || a->npages > MAX_PAGES || !PAGE_ALIGNED(a->iova) ||
	    a->pasid == VIOMMU_DMA_NO_PASID || vdma_domain_of(v, a->pasid))
		return -EINVAL;
	for (i = 0; i < MAX_DOMAINS && !d; i++)
		if (!v->dom[i].domain)
			d = &v->dom[i];
	if (!d)
		return -ENOSPC;
	d->domain = iommu_paging_domain_alloc(dev);
	if (IS_ERR(d->domain)) {
		ret = PTR_ERR(d->domain);
		d->domain = NULL;
		return ret;
	}
	d->pasid = a->pasid;
	d->iova = a->iova;
	d->pages = kcalloc(a->npages, sizeof(*d->pages), GFP_KERNEL);
	if (!d->pages) {
		iommu_domain_free(d->domain);
		memset(d, 0, sizeof(*d));
		return -ENOMEM;
	}
	ret = iommu_attach_device_pasid(d->domain, dev, d->pasid, NULL);
	if (ret) {
		kfree(d->pages);
		iommu_domain_free(d->domain);
		memset(d, 0, sizeof(*d));
		return ret;
	}
	for (i = 0; i < a->npages; i++) {
		d->pages[i] = alloc_page(GFP_KERNEL | __GFP_ZERO);
		if (!d->pages[i]) {
			ret = -ENOMEM;
			break;
		}
		d->npages = i + 1;
		ret = iommu_map(d->domain, d->iova + (u64)i * PAGE_SIZE, page_to_phys(d->pages[i]),
				PAGE_SIZE, IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
		if (ret) {
			__free_page(d->pages[i]);
			d->pages[i] = NULL;
			break;
		}
	}
	if (ret)
		vdma_domain_free(v, d);
	return ret;
}

static long vdma_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct vdma_file *f = file->private_data;
	struct vdma *v = f->v;
	void __user *up = (void __user *)arg;
	struct viommu_dma_copy c;
	struct viommu_dma_pasid a;
	struct viommu_dma_info info = {};
	struct vdma_domain *d;
	u32 pasid;
	long ret;

	mutex_lock(&v->lock);
	switch (cmd) {
	case VIOMMU_DMA_INFO: {
		struct iommu_domain *dd = iommu_get_domain_for_dev(&v->pdev->dev);

		info.version = readl(v->regs + REG_VERSION);
		info.pasid_bits = v->pdev->pasid_enabled ? ilog2(pci_max_pasids(v->pdev)) : 0;
		info.sva = !v->sva_errno;
		info.sva_errno = -v->sva_errno;
		info.default_domain_type = dd ? dd->type : 0;
		ret = copy_to_user(up, &info, sizeof(info)) ? -EFAULT : 0;
		break;
	}
	case VIOMMU_DMA_COPY:
		ret = -EFAULT;
		if (copy_from_user(&c, up, sizeof(c)))
			break;
		c.status = c.err_code = c.event = c.stalls = c.mismatches = 0;
		c.elapsed_ns = 0;
		ret = -EINVAL;
		if (!c.len || c.len > MAX_LEN)
			break;
		switch (c.mode) {
		case VIOMMU_DMA_STREAMING:
		case VIOMMU_DMA_COHERENT:
			ret = vdma_copy_dma_api(v, &c);
			break;
		case VIOMMU_DMA_PASID_DOMAIN:
			ret = vdma_copy_pasid(v, &c);
			break;
		case VIOMMU_DMA_SVA:
			ret = f->sva ? vdma_run(v, c.src, c.dst, iommu_sva_get_pasid(f->sva), &c) : -ENXIO;
			break;
		}
		if ((!ret || ret == -EIO) && copy_to_user(up, &c, sizeof(c)))
			ret = -EFAULT;
		break;
	case VIOMMU_DMA_PASID_ATTACH:
		ret = copy_from_user(&a, up, sizeof(a)) ? -EFAULT : vdma_pasid_attach(v, &a);
		break;
	case VIOMMU_DMA_PASID_DETACH:
		ret = -EFAULT;
		if (get_user(pasid, (u32 __user *)up))
			break;
		d = vdma_domain_of(v, pasid);
		ret = d ? 0 : -ENOENT;
		if (d)
			vdma_domain_free(v, d);
		break;
	case VIOMMU_DMA_SVA_BIND:
		ret = -EBUSY;
		if (f->sva)
			break;
		ret = v->sva_errno;
		if (ret)
			break;
		f->sva = iommu_sva_bind_device(&v->pdev->dev, current->mm);
		if (IS_ERR(f->sva)) {
			ret = PTR_ERR(f->sva);
			f->sva = NULL;
			break;
		}
		ret = put_user(iommu_sva_get_pasid(f->sva), (u32 __user *)up);
		break;
	case VIOMMU_DMA_SVA_UNBIND:
		ret = f->sva ? 0 : -ENXIO;
		if (f->sva)
			iommu_sva_unbind_device(f->sva);
		f->sva = NULL;
		break;
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&v->lock);
	return ret;
}

static int vdma_open(struct inode *inode, struct file *file)
{
	struct vdma_file *f = kzalloc(sizeof(*f), GFP_KERNEL);

	if (!f)
		return -ENOMEM;
	f->v = vdma_dev;
	file->private_data = f;
	return 0;
}

static int vdma_release(struct inode *inode, struct file *file)
{
	struct vdma_file *f = file->private_data;

	if (f->sva)
		iommu_sva_unbind_device(f->sva);
	kfree(f);
	return 0;
}

static const struct file_operations vdma_fops = {
	.owner = THIS_MODULE,
	.open = vdma_open,
	.release = vdma_release,
	.unlocked_ioctl = vdma_ioctl,
};

/* SVA needs I/O page faults (stalls or PRI); before 6.16 a driver enables both. */
static int vdma_enable_sva(struct device *dev)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 16, 0)
	int ret = iommu_dev_enable_feature(dev, IOMMU_DEV_FEAT_IOPF);

	if (ret)
		return ret;
	ret = iommu_dev_enable_feature(dev, IOMMU_DEV_FEAT_SVA);
	if (ret)
		iommu_dev_disable_feature(dev, IOMMU_DEV_FEAT_IOPF);
	return ret;
#else
	return 0;
#endif
}

static void vdma_disable_sva(struct device *dev)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 16, 0)
	iommu_dev_disable_feature(dev, IOMMU_DEV_FEAT_SVA);
	iommu_dev_disable_feature(dev, IOMMU_DEV_FEAT_IOPF);
#endif
}

static int vdma_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct vdma *v;
	int ret;

	if (vdma_dev)
		return dev_err_probe(dev, -EBUSY, "this driver serves one engine\n");
	v = devm_kzalloc(dev, sizeof(*v), GFP_KERNEL);
	if (!v)
		return -ENOMEM;
	v->pdev = pdev;
	mutex_init(&v->lock);
	init_completion(&v->done);
	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	pci_set_master(pdev);
	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret)
		return ret;
	v->regs = pcim_iomap(pdev, 0, 0);
	if (!v->regs)
		return -ENOMEM;
	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_INTX);
	if (ret < 0)
		return ret;
	writel(~0u, v->regs + REG_IRQ_STATUS);
	ret = devm_request_irq(dev, pci_irq_vector(pdev, 0), vdma_irq, IRQF_SHARED, "viommu_dma", v);
	if (ret)
		return ret;
	v->sva_errno = vdma_enable_sva(dev);
	v->misc.minor = MISC_DYNAMIC_MINOR;
	v->misc.name = "viommu-dma";
	v->misc.fops = &vdma_fops;
	pci_set_drvdata(pdev, v);
	vdma_dev = v;
	ret = misc_register(&v->misc);
	if (ret) {
		vdma_dev = NULL;
		if (!v->sva_errno)
			vdma_disable_sva(dev);
		return ret;
	}
	dev_info(dev, "engine v%u, PASID %s, SVA %s (%d)\n", readl(v->regs + REG_VERSION),
		 pdev->pasid_enabled ? "on" : "off", v->sva_errno ? "off" : "on", v->sva_errno);
	return 0;
}

static void vdma_remove(struct pci_dev *pdev)
{
	struct vdma *v = pci_get_drvdata(pdev);
	int i;

	misc_deregister(&v->misc);
	for (i = 0; i < MAX_DOMAINS; i++)
		if (v->dom[i].domain)
			vdma_domain_free(v, &v->dom[i]);
	if (!v->sva_errno)
		vdma_disable_sva(&pdev->dev);
	vdma_dev = NULL;
}

static const struct pci_device_id vdma_ids[] = {
	{ PCI_DEVICE(0x5555, 0x0001) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vdma_ids);

static struct pci_driver vdma_driver = {
	.name = "viommu_dma",
	.id_table = vdma_ids,
	.probe = vdma_probe,
	.remove = vdma_remove,
};
module_pci_driver(vdma_driver);

MODULE_DESCRIPTION("viommu-backend: guest driver for the DMA test engine");
MODULE_LICENSE("GPL");
