/*
 * engine_regs.h: the DMA test engine's BAR0 registers (viommu_backend/endpoints/testdev.py,
 * PCI 5555:0001), for the project's guest programs (vfio_engine.h) and the VFIO
 * selftests' driver for the engine (guest_images/vfio_selftests/viommu_engine.c).
 */
#ifndef ENGINE_REGS_H
#define ENGINE_REGS_H

#define ENG_VENDOR 0x5555
#define ENG_DEVICE 0x0001
#define ENG_MAGIC 0x7E57DE71u
#define ENG_MAX_LEN (1u << 20) /* DMA_LEN's limit */

#define REG_MAGIC 0x00
#define REG_VERSION 0x04
#define REG_DMA_SRC 0x18
#define REG_DMA_DST 0x20
#define REG_DMA_LEN 0x28
#define REG_DMA_CTRL 0x2C
#define REG_DMA_STATUS 0x30
#define REG_DMA_COUNT 0x34
#define REG_DMA_SSID 0x38
#define REG_DMA_REPEAT 0x40 /* engine version 4 */

#define CTRL_GO (1u << 0)
#define ST_BUSY (1u << 0)
#define ST_DONE (1u << 1)
#define ST_ERROR (1u << 2)
#define ST_STALLED (1u << 3) /* waiting on a stalled translation (engine v3) */
#define ST_ERR_CODE(s) (((s) >> 8) & 0xff)
#define ST_EVENT(s) (((s) >> 16) & 0xff)

#endif
