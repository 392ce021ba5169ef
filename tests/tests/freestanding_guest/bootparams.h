/* The zero-page (struct boot_params) fields the guest reads;
 * offsets from Documentation/arch/x86/zero-page.rst. */
#pragma once
#include "io.h"

#define BP_E820_ENTRIES 0x1e8 /* u8 */
#define BP_HDR_MAGIC 0x202    /* u32 "HdrS" */
#define BP_CMD_LINE_PTR 0x228 /* u32 */
#define BP_CMDLINE_SIZE 0x238 /* u32 */
#define BP_E820_TABLE 0x2d0   /* 20-byte entries: u64 addr, u64 size, u32 type */
#define BP_E820_MAX 128
#define E820_RAM 1

static inline u8 bp_u8(const u8 *bp, u32 off) { return bp[off]; }
static inline u32 bp_u32(const u8 *bp, u32 off) { return *(const u32 *)(bp + off); }
static inline u64 bp_u64(const u8 *bp, u32 off) { return *(const u64 *)(bp + off); }
