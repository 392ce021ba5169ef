/* The freestanding test guest: one step per line of `key: value` output,
 * then an i8042 reset. See README.md. */
#include "io.h"
#include "bootparams.h"

static void report_cmdline(const u8 *bp) {
    const char *cmdline = (const char *)(u64)bp_u32(bp, BP_CMD_LINE_PTR);
    u32 size = bp_u32(bp, BP_CMDLINE_SIZE);
    puts("cmdline: ");
    /* Bounded by the size the VMM wrote, whatever the string holds. */
    for (u32 i = 0; i < size && i < 2048 && cmdline[i]; i++) putc(cmdline[i]);
    putc('\n');
}

static void report_e820(const u8 *bp) {
    u8 n = bp_u8(bp, BP_E820_ENTRIES);
    u64 ram = 0;
    for (u32 i = 0; i < n && i < BP_E820_MAX; i++) {
        u32 e = BP_E820_TABLE + 20 * i;
        if (bp_u32(bp, e + 16) == E820_RAM) ram += bp_u64(bp, e + 8);
    }
    puts("e820: entries ");
    puthex(n);
    puts(" ram ");
    puthex(ram);
    putc('\n');
}

/* True when the command line holds `word` as a whole argument. */
static int cmdline_has(const u8 *bp, const char *word) {
    const char *c = (const char *)(u64)bp_u32(bp, BP_CMD_LINE_PTR);
    u32 size = bp_u32(bp, BP_CMDLINE_SIZE);
    for (u32 i = 0; i < size && i < 2048 && c[i]; i++) {
        if (i > 0 && c[i - 1] != ' ') continue;
        u32 j = 0;
        while (word[j] && i + j < size && c[i + j] == word[j]) j++;
        if (!word[j] && (i + j >= size || c[i + j] == ' ' || c[i + j] == 0)) return 1;
    }
    return 0;
}

/* Waits for Ctrl-Alt-Del from the i8042 (polled: the guest has no IDT),
 * then resets: the VMM's graceful shutdown path. */
static void wait_for_ctrl_alt_del(void) {
    puts("waiting: ctrl-alt-del\n");
    for (;;) {
        for (volatile int i = 0; i < 200000; i++) __asm__ volatile("pause");
        while (inb(0x64) & 1) {
            if (inb(0x60) == 0x71) {
                puts("got: ctrl-alt-del\n");
                return;
            }
        }
    }
}

void guest_main(const u8 *boot_params) {
    puts("vmpod freestanding guest: hello\n");
    puts("boot_params: ");
    puthex((u64)boot_params);
    puts(" magic ");
    puthex(bp_u32(boot_params, BP_HDR_MAGIC));
    putc('\n');
    report_cmdline(boot_params);
    report_e820(boot_params);
    if (cmdline_has(boot_params, "guest.idle")) {
        /* Interrupts off, halted: an idle VM that ignores shutdown requests. */
        puts("idle: halting\n");
        return;
    }
    if (cmdline_has(boot_params, "guest.wait_cad")) wait_for_ctrl_alt_del();
    puts("done: resetting\n");
    i8042_reset();
}
