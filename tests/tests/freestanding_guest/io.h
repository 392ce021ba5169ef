/* Port I/O and the 16550 console for the freestanding guest. */
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

#define COM1 0x3f8
#define LSR_THRE 0x20

static void putc(char c) {
    /* Bounded wait: a broken UART must not hang the guest forever. */
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & LSR_THRE); i++) {}
    outb(COM1, (u8)c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void puthex(u64 v) {
    puts("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        u8 nib = (v >> shift) & 0xf;
        if (nib || started || shift == 0) {
            putc("0123456789abcdef"[nib]);
            started = 1;
        }
    }
}

/* Resets the machine through the i8042 (what Linux's reboot=k does). */
static void i8042_reset(void) { outb(0x64, 0xfe); }
