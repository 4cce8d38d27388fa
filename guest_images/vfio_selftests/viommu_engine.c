// SPDX-License-Identifier: GPL-2.0-only
/*
 * viommu_engine: the VFIO selftests' driver (struct vfio_pci_driver_ops) for the DMA
 * test engine of viommu-backend (viommu_backend/endpoints/testdev.py, PCI 5555:0001).
 *
 * The image build copies this file to lib/drivers/viommu_engine/ of a copy of the
 * kernel's tools/testing/selftests/vfio and registers it in the library's driver table
 * and source list (viommu_backend/guest/vfio_selftests.py).
 *
 * The engine copies DMA_LEN bytes from DMA_SRC to DMA_DST on a GO write, DMA_REPEAT
 * times over (engine version 4), and reports in DMA_STATUS: BUSY until the series ends,
 * then DONE or ERROR (a translation fault, no bus master, ...).
 *
 * No send_msi(): the engine can signal an MSI-X vector (its DOORBELL register), but the
 * guest runs under QEMU, which delivers a vfio-user device's MSIs itself, untranslated,
 * to the doorbell IOVA the guest's SMMU domain maps; every domain the selftests attach
 * translates, so such an MSI never reaches the guest's eventfd.  The selftests skip
 * what needs it ("Driver does not support send_msi()").
 */
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include <linux/io.h>

#include <libvfio.h>

#include "engine_regs.h" /* guest_images/programs/, copied next to this file by the build */

#define ENGINE_MIN_VERSION 4 /* DMA_REPEAT */

/*
 * The engine copies up to ENG_MAX_LEN (1 MiB) per copy and DMA_REPEAT.COUNT (16 bits)
 * copies per GO; the driver offers less.  Every test must end within the harness's
 * timeout (30 s, memcpy_storm 60 s, fixture set-up included) on an engine written in
 * Python behind the emulated SMMU, with the guest under TCG on shared cores: with 1 MiB
 * copies a run of the suite here moved ~6 copies a second with the host at load 4 and
 * ~1 a second at load 9, so memcpy_storm (count copies of the largest size) and
 * mix_and_match (ten rounds of 4 x the largest size) were at risk.  64 KiB x 256 keeps
 * every test to a few MiB of DMA.
 */
#define DRIVER_MAX_SIZE (64u << 10)
#define DRIVER_MAX_COUNT 256
#define WAIT_SECONDS 50

struct engine_state {
	uint32_t count_at_start; /* DMA_COUNT when the series was started */
	uint32_t series;         /* copies in the series */
};

static void *engine_regs(struct vfio_pci_device *device)
{
	return device->bars[0].vaddr;
}

static struct engine_state *engine_state(struct vfio_pci_device *device)
{
	return device->driver.region.vaddr;
}

static int engine_probe(struct vfio_pci_device *device)
{
	void *regs = engine_regs(device);

	if (!vfio_pci_device_match(device, ENG_VENDOR, ENG_DEVICE))
		return -EINVAL;
	if (!regs) {
		dev_err(device, "viommu_engine: BAR0 is not mapped\n");
		return -EINVAL;
	}
	if (readl(regs + REG_MAGIC) != ENG_MAGIC || readl(regs + REG_VERSION) < ENGINE_MIN_VERSION) {
		dev_err(device, "viommu_engine: MAGIC 0x%x VERSION %u (need 0x%x, >= %u)\n",
			readl(regs + REG_MAGIC), readl(regs + REG_VERSION), ENG_MAGIC, ENGINE_MIN_VERSION);
		return -EINVAL;
	}
	return 0;
}

static uint32_t engine_wait_idle(struct vfio_pci_device *device)
{
	void *regs = engine_regs(device);
	struct timespec start, now;
	uint32_t status;

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		status = readl(regs + REG_DMA_STATUS);
		if (!(status & ST_BUSY))
			return status;
		clock_gettime(CLOCK_MONOTONIC, &now);
		VFIO_ASSERT_LT(now.tv_sec - start.tv_sec, WAIT_SECONDS,
			       "viommu_engine: still busy after %d s (DMA_COUNT %u)\n", WAIT_SECONDS,
			       readl(regs + REG_DMA_COUNT));
		usleep(100);
	}
}

static void engine_init(struct vfio_pci_device *device)
{
	VFIO_ASSERT_GE(device->driver.region.size, sizeof(struct engine_state));

	vfio_pci_config_writew(device, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER |
			       PCI_COMMAND_INTX_DISABLE);
	engine_wait_idle(device); /* a series left running by a previous user */
	writel(0, engine_regs(device) + REG_DMA_SSID); /* no SubstreamID */

	device->driver.msi = 0; /* not signalled: no send_msi(), see above */
	device->driver.max_memcpy_size = DRIVER_MAX_SIZE;
	device->driver.max_memcpy_count = DRIVER_MAX_COUNT;
}

static void engine_remove(struct vfio_pci_device *device)
{
	engine_wait_idle(device);
	vfio_pci_cmd_clear(device, PCI_COMMAND_MASTER);
}

static void engine_memcpy_start(struct vfio_pci_device *device, iova_t src, iova_t dst, u64 size,
				u64 count)
{
	void *regs = engine_regs(device);
	struct engine_state *state = engine_state(device);

	state->count_at_start = readl(regs + REG_DMA_COUNT);
	state->series = count;
	writel((uint32_t)src, regs + REG_DMA_SRC);
	writel((uint32_t)(src >> 32), regs + REG_DMA_SRC + 4);
	writel((uint32_t)dst, regs + REG_DMA_DST);
	writel((uint32_t)(dst >> 32), regs + REG_DMA_DST + 4);
	writel((uint32_t)size, regs + REG_DMA_LEN);
	writel((uint32_t)count, regs + REG_DMA_REPEAT);
	writel(CTRL_GO, regs + REG_DMA_CTRL); /* no completion interrupt */
}

static int engine_memcpy_wait(struct vfio_pci_device *device)
{
	struct engine_state *state = engine_state(device);
	uint32_t status = engine_wait_idle(device);
	uint32_t done = readl(engine_regs(device) + REG_DMA_COUNT) - state->count_at_start;

	if (status & ST_ERROR) {
		dev_err(device, "viommu_engine: copy %u of %u failed: DMA_STATUS 0x%x (error %u, event 0x%x)\n",
			done + 1, state->series, status, ST_ERR_CODE(status), ST_EVENT(status));
		return -1;
	}
	if (!(status & ST_DONE) || done != state->series) {
		dev_err(device, "viommu_engine: DMA_STATUS 0x%x after %u of %u copies\n", status, done,
			state->series);
		return -1;
	}
	return 0;
}

struct vfio_pci_driver_ops viommu_engine_ops = {
	.name = "viommu_engine",
	.probe = engine_probe,
	.init = engine_init,
	.remove = engine_remove,
	.memcpy_start = engine_memcpy_start,
	.memcpy_wait = engine_memcpy_wait,
};
