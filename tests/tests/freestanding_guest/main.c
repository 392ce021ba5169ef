/* The freestanding test guest: one step per line of `key: value` output,
 * then an i8042 reset. See README.md. */
#include "io.h"
#include "bootparams.h"
#include "virtio.h"

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

/* Finds the first `virtio_mmio.device=4K@0x<base>:<gsi>` on the command
 * line and returns <base> (0 when there is none). The start of a virtio-mmio
 * driver: the devices the VMM declares are found exactly as Linux finds them. */
static u64 first_virtio_mmio_base(const u8 *bp, u32 *gsi) {
    static const char key[] = "virtio_mmio.device=4K@0x";
    const char *c = (const char *)(u64)bp_u32(bp, BP_CMD_LINE_PTR);
    u32 size = bp_u32(bp, BP_CMDLINE_SIZE);
    for (u32 i = 0; i < size && i < 2048 && c[i]; i++) {
        u32 j = 0;
        while (key[j] && i + j < size && c[i + j] == key[j]) j++;
        if (key[j]) continue;
        u64 base = 0;
        u32 k = i + j;
        for (; k < size && k < i + j + 16; k++) {
            char h = c[k];
            u64 d;
            if (h >= '0' && h <= '9') d = h - '0';
            else if (h >= 'a' && h <= 'f') d = h - 'a' + 10;
            else break;
            base = base << 4 | d;
        }
        *gsi = 0;
        if (k < size && c[k] == ':')
            for (k++; k < size && k < i + j + 24 && c[k] >= '0' && c[k] <= '9'; k++)
                *gsi = *gsi * 10 + (u32)(c[k] - '0');
        return base;
    }
    return 0;
}

/* The VMM's boot page tables map only the first GiB (as Firecracker's do);
 * the MMIO gap at 3-4 GiB needs our own page directory, uncached. */
static u64 mmio_pd[512] __attribute__((aligned(4096)));

static void map_mmio_gap(void) {
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL);
    u64 *pdpt = (u64 *)(pml4[0] & ~0xfffUL);
    for (u64 i = 0; i < 512; i++)
        mmio_pd[i] = ((3UL << 30) + (i << 21)) | 0x80 /* 2 MiB */ | 0x10 /* PCD */ | 0x08 /* PWT */ | 0x3;
    pdpt[3] = (u64)mmio_pd | 0x3;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050

/* Reads the first virtio-mmio device's magic (an MMIO exit routed by the
 * VMM's bus) and notifies its queue 0 (an ioeventfd: no exit at all). */
static void probe_virtio_mmio(const u8 *bp) {
    u32 gsi;
    u64 base = first_virtio_mmio_base(bp, &gsi);
    if (!base) return;
    map_mmio_gap();
    puts("virtio-mmio: base ");
    puthex(base);
    puts(" gsi ");
    puthex(gsi);
    puts(" magic ");
    puthex(mmio_read32(base + VIRTIO_MMIO_MAGIC));
    putc('\n');
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    puts("virtio-mmio: notified queue 0\n");
}

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

/* A hostile guest: touches every I/O port (byte reads, dword writes) and
 * the whole MMIO gap where no device sits. The VMM must answer each access,
 * log only a bounded number of them, and keep running. */
static void hostile_accesses(void) {
    map_mmio_gap();
    for (u32 port = 0; port < 0x10000; port++) {
        /* The console and the i8042 (0xfe on 0x64 is a reset) stay usable. */
        if ((port >= 0x3f8 && port <= 0x3ff) || (port >= 0x60 && port <= 0x64)) continue;
        (void)inb((u16)port);
        outl((u16)port, 0xdeadbeef);
    }
    /* 64 KiB steps through the gap, below the IOAPIC and LAPIC (in-kernel). */
    for (u64 a = 0xd0000000UL; a < 0xfec00000UL; a += 0x10000) {
        (void)mmio_read32(a + 0x44);
        mmio_write32(a + 0x48, 0x12345678);
    }
    puts("hostile: done\n");
}

/* Interrupts: an IDT, the LAPIC enabled, the 8259s masked and one IOAPIC
 * pin routed to IRQ_VECTOR — how a virtio driver gets its used-buffer
 * notifications. */
#define IRQ_VECTOR 0x30
#define LAPIC 0xfee00000UL
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define IOAPIC 0xfec00000UL

extern void irq_entry(void);
extern void timer_entry(void);
static u64 idt[512] __attribute__((aligned(16)));
volatile u32 irq_count;
volatile u32 tick_count;

void irq_handler(void) {
    irq_count++;
    mmio_write32(LAPIC + LAPIC_EOI, 0);
}

void timer_handler(void) {
    tick_count++;
    mmio_write32(LAPIC + LAPIC_EOI, 0);
}

static void set_gate(u32 vector, void (*handler)(void)) {
    u64 h = (u64)handler;
    idt[2 * vector] = (h & 0xffff) | (0x08UL << 16) | (0x8eUL << 40) | ((h >> 16 & 0xffff) << 48);
    idt[2 * vector + 1] = h >> 32;
}

static void ioapic_write(u32 reg, u32 value) {
    mmio_write32(IOAPIC, reg);
    mmio_write32(IOAPIC + 0x10, value);
}

static void setup_interrupts(u32 gsi) {
    struct __attribute__((packed)) { u16 limit; u64 base; } idtr = { sizeof(idt) - 1, (u64)idt };
    map_mmio_gap();
    set_gate(IRQ_VECTOR, irq_entry);
    __asm__ volatile("lidt %0" : : "m"(idtr));
    outb(0x21, 0xff); /* mask both 8259s: interrupts come through the IOAPIC */
    outb(0xa1, 0xff);
    mmio_write32(LAPIC + LAPIC_TPR, 0);
    mmio_write32(LAPIC + LAPIC_SVR, 0x100 | 0xff); /* enabled, spurious vector 0xff */
    ioapic_write(0x11 + 2 * gsi, 0);              /* destination: APIC ID 0 */
    ioapic_write(0x10 + 2 * gsi, IRQ_VECTOR);     /* fixed, edge, active high, unmasked */
}

/* Waits (halted, interrupts on) for one interrupt on the first virtio
 * device's GSI; the host raises it through the device's irqfd. */
static void wait_for_irq(const u8 *bp) {
    u32 gsi;
    if (!first_virtio_mmio_base(bp, &gsi)) return;
    setup_interrupts(gsi);
    puts("irq: waiting\n");
    while (!irq_count) __asm__ volatile("sti; hlt; cli");
    puts("irq: received vector ");
    puthex(IRQ_VECTOR);
    putc('\n');
}

#define TIMER_VECTOR 0x31
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0

/* Routes another GSI to IRQ_VECTOR (setup_interrupts must have run). */
static void route_gsi(u32 gsi) {
    ioapic_write(0x11 + 2 * gsi, 0);
    ioapic_write(0x10 + 2 * gsi, IRQ_VECTOR);
}

/* A periodic LAPIC timer (~1 ms at KVM's 1 GHz APIC bus): it bounds every
 * wait, so a device that never answers fails a step instead of hanging. */
static void start_timer(void) {
    set_gate(TIMER_VECTOR, timer_entry);
    mmio_write32(LAPIC + LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
    mmio_write32(LAPIC + LAPIC_LVT_TIMER, (1 << 17) | TIMER_VECTOR);
    mmio_write32(LAPIC + LAPIC_TIMER_INIT, 1000000);
}

/* Every `virtio_mmio.device=` on the command line, in order. */
static u32 all_virtio_mmio(const u8 *bp, struct vdev *devs, u32 max) {
    static const char key[] = "virtio_mmio.device=4K@0x";
    const char *c = (const char *)(u64)bp_u32(bp, BP_CMD_LINE_PTR);
    u32 size = bp_u32(bp, BP_CMDLINE_SIZE), n = 0;
    for (u32 i = 0; i < size && i < 2048 && c[i] && n < max; i++) {
        u32 j = 0;
        while (key[j] && i + j < size && c[i + j] == key[j]) j++;
        if (key[j]) continue;
        u64 base = 0;
        u32 k = i + j;
        for (; k < size && k < i + j + 16; k++) {
            char h = c[k];
            u64 d;
            if (h >= '0' && h <= '9') d = h - '0';
            else if (h >= 'a' && h <= 'f') d = h - 'a' + 10;
            else break;
            base = base << 4 | d;
        }
        u32 gsi = 0;
        if (k < size && c[k] == ':')
            for (k++; k < size && k < i + j + 24 && c[k] >= '0' && c[k] <= '9'; k++)
                gsi = gsi * 10 + (u32)(c[k] - '0');
        devs[n].base = base;
        devs[n].gsi = gsi;
        devs[n].id = mmio_read32(base + VMMIO_DEVICE_ID);
        n++;
    }
    return n;
}

static void report_init(const char *name, int err) {
    puts(name);
    puts(": init failed at step ");
    puthex((u64)err);
    putc('\n');
}

static volatile u8 rng_buf[32];

static void drive_rng(struct vdev *d) {
    int err = vdev_init(d, 1);
    if (!err) err = vdev_ready(d);
    if (err) return report_init("rng", err);
    vq_set_desc(&d->q[0], 0, rng_buf, sizeof(rng_buf), DESC_F_WRITE, 0);
    vq_push(&d->q[0], 0);
    vq_notify(&d->q[0]);
    u32 id, len = 0;
    u32 nonzero = 0;
    if (vq_wait(&d->q[0], &id, &len))
        for (u32 i = 0; i < sizeof(rng_buf); i++) nonzero += rng_buf[i] != 0;
    puts("rng: read ");
    puthex(len);
    puts(" bytes, nonzero ");
    puts(nonzero > 8 ? "yes" : "no");
    putc('\n');
}

static volatile u8 blk_buf[8192] __attribute__((aligned(512)));
static const char blk_message[] = "written by the vmpod freestanding guest";

static void blk_report(u32 slot, const char *what) {
    puts("blk");
    puthex(slot);
    puts(": ");
    puts(what);
}

/* Reads the whole (small) disk and reports its capacity and checksum. */
static void blk_read_all(struct vdev *d, u32 slot) {
    u64 sectors = vdev_config64(d, 0);
    u32 bytes = sectors * 512 > sizeof(blk_buf) ? sizeof(blk_buf) : (u32)sectors * 512;
    u8 st = blk_request(d, BLK_T_IN, 0, blk_buf, bytes);
    blk_report(slot, "capacity ");
    puthex(sectors);
    puts(" read status ");
    puthex(st);
    puts(" sum ");
    puthex(fnv1a(blk_buf, bytes));
    putc('\n');
}

/* Slot 0 (read-only): read and checksum, then a write that must fail.
 * Slot 1 (read-write): write sector 1 and flush.
 * Slot 2 (empty at boot): wait for the host to attach a disk (a
 * config-change interrupt), then read it like slot 0. */
static volatile u8 bench_buf[65536] __attribute__((aligned(4096)));

/* `guest.blkbench`: reads the whole of slot 0 in 64 KiB requests, one in
 * flight at a time; the host times the two lines (docs/benchmarks.md). */
static void blk_bench(struct vdev *d) {
    u64 sectors = vdev_config64(d, 0);
    u64 bytes = 0, requests = 0, failed = 0;
    puts("blkbench: start\n");
    for (u64 s = 0; s + 128 <= sectors; s += 128) {
        if (blk_request(d, BLK_T_IN, s, bench_buf, sizeof(bench_buf)) != 0) failed++;
        bytes += sizeof(bench_buf);
        requests++;
    }
    puts("blkbench: read ");
    puthex(bytes);
    puts(" bytes in ");
    puthex(requests);
    puts(" requests, failed ");
    puthex(failed);
    putc('\n');
}

static int blkbench_mode;

static void drive_blk(struct vdev *d, u32 slot) {
    int err = vdev_init(d, 1);
    if (!err) err = vdev_ready(d);
    if (err) return report_init("blk", err);
    if (slot == 0 && blkbench_mode) blk_bench(d);
    if (slot == 0) {
        blk_read_all(d, slot);
        u8 st = blk_request(d, BLK_T_OUT, 0, blk_buf, 512);
        blk_report(slot, "write status ");
        puthex(st);
        putc('\n');
    } else if (slot == 1) {
        for (u32 i = 0; i < 512; i++) blk_buf[i] = i < sizeof(blk_message) ? blk_message[i] : 0;
        u8 st = blk_request(d, BLK_T_OUT, 1, blk_buf, 512);
        u8 fl = blk_request(d, BLK_T_FLUSH, 0, 0, 0);
        blk_report(slot, "write status ");
        puthex(st);
        puts(" flush status ");
        puthex(fl);
        putc('\n');
    } else if (slot == 2) {
        vdev_ack(d);
        blk_report(slot, "capacity ");
        puthex(vdev_config64(d, 0));
        puts(", waiting for a disk\n");
        u32 deadline = tick_count + WAIT_TICKS;
        u32 status = 0;
        while (!((status |= vdev_ack(d)) & 2) && idle_wait(deadline)) {}
        blk_report(slot, (status & 2) ? "config changed\n" : "no config change\n");
        if (status & 2) blk_read_all(d, slot);
    }
}

static volatile u8 vsock_rx[VQ_SIZE][VSOCK_BUF] __attribute__((aligned(16)));
static volatile u8 vsock_tx[VSOCK_BUF] __attribute__((aligned(16)));
static volatile u8 vsock_ev[8];
#define VSOCK_PORT 5000

static void vsock_send(struct vdev *d, const volatile struct vsock_hdr *to, u16 op, u32 fwd,
                       const volatile u8 *data, u32 len) {
    volatile struct vsock_hdr *h = (volatile struct vsock_hdr *)vsock_tx;
    h->src_cid = to->dst_cid;
    h->dst_cid = to->src_cid;
    h->src_port = to->dst_port;
    h->dst_port = to->src_port;
    h->len = len;
    h->type = 1; /* stream */
    h->op = op;
    h->flags = 0;
    h->buf_alloc = 65536;
    h->fwd_cnt = fwd;
    for (u32 i = 0; i < len; i++) {
        u8 c = data[i];
        vsock_tx[VSOCK_HDR + i] = (c >= 'a' && c <= 'z') ? c - 32 : c;
    }
    struct vq *q = &d->q[1];
    vq_set_desc(q, 0, vsock_tx, VSOCK_HDR + len, 0, 0);
    vq_push(q, 0);
    vq_notify(q);
    u32 id, used;
    vq_wait(q, &id, &used);
}

#define VSOCK_HOST_PORT 6000
#define VSOCK_LOCAL_PORT 7000

/* Waits for the next packet to our local port (others are returned to the
 * queue); returns its rx buffer index, or -1 on timeout. The caller reposts it. */
static int vsock_next(struct vdev *d) {
    for (;;) {
        u32 id, len;
        if (!vq_wait(&d->q[0], &id, &len)) return -1;
        if (id < VQ_SIZE && len >= VSOCK_HDR &&
            ((volatile struct vsock_hdr *)vsock_rx[id])->dst_port == VSOCK_LOCAL_PORT)
            return (int)id;
        vq_push(&d->q[0], (u16)id);
        vq_notify(&d->q[0]);
    }
}

static void vsock_repost(struct vdev *d, int id) {
    vq_push(&d->q[0], (u16)id);
    vq_notify(&d->q[0]);
}

/* Connects out to the host's port VSOCK_HOST_PORT (the VMM connects to
 * `<uds>_6000`), sends a line, prints the host's reply, resets. */
static void vsock_connect_out(struct vdev *d, u64 cid) {
    static const u8 ping[] = "ping from the guest\n";
    struct vsock_hdr peer = {0};
    peer.src_cid = 2;
    peer.dst_cid = cid;
    peer.src_port = VSOCK_HOST_PORT;
    peer.dst_port = VSOCK_LOCAL_PORT;
    vsock_send(d, &peer, VSOCK_OP_REQUEST, 0, 0, 0);
    int id = vsock_next(d);
    if (id < 0 || ((volatile struct vsock_hdr *)vsock_rx[id])->op != VSOCK_OP_RESPONSE) {
        puts("vsock: connect to host port failed\n");
        if (id >= 0) vsock_repost(d, id);
        return;
    }
    vsock_repost(d, id);
    puts("vsock: connected to host port ");
    puthex(VSOCK_HOST_PORT);
    putc('\n');
    vsock_send(d, &peer, VSOCK_OP_RW, 0, ping, sizeof(ping) - 1);
    for (;;) {
        id = vsock_next(d);
        if (id < 0) {
            puts("vsock: no reply from the host\n");
            return;
        }
        volatile struct vsock_hdr *h = (volatile struct vsock_hdr *)vsock_rx[id];
        if (h->op == VSOCK_OP_RW) {
            u32 n = h->len;
            puts("vsock: host replied ");
            for (u32 i = 0; i < n && i < 64; i++) {
                u8 c = vsock_rx[id][VSOCK_HDR + i];
                if (c >= 0x20 && c < 0x7f) putc(c);
            }
            putc('\n');
            vsock_repost(d, id);
            break;
        }
        u16 op = h->op;
        vsock_repost(d, id);
        if (op == VSOCK_OP_RST) {
            puts("vsock: host reset the connection\n");
            return;
        }
    }
    vsock_send(d, &peer, VSOCK_OP_RST, 0, 0, 0);
}

/* Listens on VSOCK_PORT: answers the host's connection request, echoes
 * every byte uppercased, ends when the host shuts the stream down. */
static void drive_vsock(struct vdev *d) {
    int err = vdev_init(d, 3);
    if (err) return report_init("vsock", err);
    for (u16 i = 0; i < VQ_SIZE; i++) {
        vq_set_desc(&d->q[0], i, vsock_rx[i], VSOCK_BUF, DESC_F_WRITE, 0);
        vq_push(&d->q[0], i);
    }
    vq_set_desc(&d->q[2], 0, vsock_ev, sizeof(vsock_ev), DESC_F_WRITE, 0);
    vq_push(&d->q[2], 0);
    err = vdev_ready(d);
    if (err) return report_init("vsock", err);
    vq_notify(&d->q[0]);
    puts("vsock: cid ");
    puthex(vdev_config64(d, 0));
    puts(" listening on port ");
    puthex(VSOCK_PORT);
    putc('\n');
    u32 fwd = 0, echoed = 0, connected = 0;
    for (;;) {
        u32 id, len;
        if (!vq_wait(&d->q[0], &id, &len)) {
            puts("vsock: timed out\n");
            break;
        }
        if (id >= VQ_SIZE || len < VSOCK_HDR) continue;
        const volatile struct vsock_hdr *h = (const volatile struct vsock_hdr *)vsock_rx[id];
        u16 op = h->op;
        int done = 0;
        if (op == VSOCK_OP_REQUEST) {
            if (h->dst_port == VSOCK_PORT) {
                connected++;
                vsock_send(d, h, VSOCK_OP_RESPONSE, 0, 0, 0);
                puts("vsock: accepted from host port ");
                puthex(h->src_port);
                putc('\n');
            } else {
                vsock_send(d, h, VSOCK_OP_RST, 0, 0, 0);
            }
        } else if (op == VSOCK_OP_RW) {
            u32 n = h->len;
            if (n > len - VSOCK_HDR) n = len - VSOCK_HDR;
            fwd += n;
            echoed += n;
            vsock_send(d, h, VSOCK_OP_RW, fwd, vsock_rx[id] + VSOCK_HDR, n);
        } else if (op == VSOCK_OP_CREDIT_REQUEST) {
            vsock_send(d, h, VSOCK_OP_CREDIT_UPDATE, fwd, 0, 0);
        } else if (op == VSOCK_OP_SHUTDOWN) {
            vsock_send(d, h, VSOCK_OP_RST, fwd, 0, 0);
            done = 1;
        } else if (op == VSOCK_OP_RST) {
            done = 1;
        }
        vq_push(&d->q[0], (u16)id);
        vq_notify(&d->q[0]);
        if (done && connected) break;
    }
    puts("vsock: echoed ");
    puthex(echoed);
    puts(" bytes\n");
    vsock_connect_out(d, vdev_config64(d, 0));
}

/* ---- virtio-net (`guest.net`): one frame out, one frame in ----
 * Queue 0 receives, queue 1 transmits; every buffer starts with the 12-byte
 * virtio_net_hdr (VIRTIO_F_VERSION_1), all zeros on transmit. The frame out
 * is a broadcast of EtherType 0x88b5 (local experimental) carrying a fixed
 * text; the test's responder on the tap answers with its own. */
#define NET_HDR 12
static volatile u8 net_rx[NET_HDR + 1514] __attribute__((aligned(16)));
static volatile u8 net_tx[NET_HDR + 64] __attribute__((aligned(16)));
static const char net_out[] = "vmpod freestanding guest: frame out";

static void drive_net(struct vdev *d) {
    int err = vdev_init(d, 2);
    if (err) return report_init("net", err);
    vq_set_desc(&d->q[0], 0, net_rx, sizeof(net_rx), DESC_F_WRITE, 0);
    vq_push(&d->q[0], 0);
    err = vdev_ready(d);
    if (err) return report_init("net", err);
    vq_notify(&d->q[0]);
    for (u32 i = 0; i < sizeof(net_tx); i++) net_tx[i] = 0;
    volatile u8 *f = net_tx + NET_HDR;
    for (u32 i = 0; i < 6; i++) f[i] = 0xff;            /* broadcast */
    for (u32 i = 0; i < 6; i++) f[6 + i] = (u8)mmio_read8(d->base + VMMIO_CONFIG + i); /* our MAC */
    f[12] = 0x88;
    f[13] = 0xb5;
    for (u32 i = 0; i < sizeof(net_out) - 1; i++) f[14 + i] = (u8)net_out[i];
    u32 frame = 14 + sizeof(net_out) - 1;
    /* Like any datagram protocol, resend until answered (a frame can be
     * lost while the host's side of the tap comes up): up to 10 tries, 1 s
     * apart. Frames of other types (the host's IPv6 chatter) are skipped. */
    u32 id, len = 0;
    int got = 0;
    for (u32 attempt = 0; attempt < 10 && !got; attempt++) {
        vq_set_desc(&d->q[1], 0, net_tx, NET_HDR + (frame < 60 ? 60 : frame), 0, 0);
        vq_push(&d->q[1], 0);
        vq_notify(&d->q[1]);
        if (!vq_wait(&d->q[1], &id, &len)) {
            puts("net: send timed out\n");
            return;
        }
        if (attempt == 0) puts("net: frame sent\n");
        while (vq_wait_ticks(&d->q[0], &id, &len, 1000)) {
            if (len >= NET_HDR + 14 && net_rx[NET_HDR + 12] == 0x88 && net_rx[NET_HDR + 13] == 0xb5) {
                got = 1;
                break;
            }
            vq_push(&d->q[0], 0);
            vq_notify(&d->q[0]);
        }
    }
    if (!got) {
        puts("net: nothing received\n");
        return;
    }
    puts("net: received type ");
    puthex((u64)net_rx[NET_HDR + 12] << 8 | net_rx[NET_HDR + 13]);
    puts(" payload ");
    for (u32 i = NET_HDR + 14; i < len && net_rx[i] >= 0x20 && net_rx[i] < 0x7f; i++) putc(net_rx[i]);
    putc('\n');
}

static int net_mode;

/* `guest.virtio`: drive every device the VMM declared through real
 * virtqueues, with interrupts routed through the IOAPIC. */
static void drive_virtio(const u8 *bp) {
    struct vdev devs[16];
    map_mmio_gap();
    u32 n = all_virtio_mmio(bp, devs, 16);
    if (!n) {
        puts("virtio: no devices\n");
        return;
    }
    setup_interrupts(devs[0].gsi);
    for (u32 i = 1; i < n; i++) route_gsi(devs[i].gsi);
    start_timer();
    u32 slot = 0;
    for (u32 i = 0; i < n; i++) {
        if (devs[i].id == VIRTIO_ID_RNG) drive_rng(&devs[i]);
        else if (devs[i].id == VIRTIO_ID_BLOCK) drive_blk(&devs[i], slot++);
        else if (devs[i].id == VIRTIO_ID_NET && net_mode) drive_net(&devs[i]);
    }
    for (u32 i = 0; i < n; i++)
        if (devs[i].id == VIRTIO_ID_VSOCK) drive_vsock(&devs[i]);
    /* Quiesce: no more interrupts while the guest resets. */
    mmio_write32(LAPIC + LAPIC_LVT_TIMER, 1 << 16);
    for (u32 i = 0; i < n; i++) mmio_write32(devs[i].base + VMMIO_STATUS, 0);
    puts("virtio: device interrupts ");
    puts(irq_count ? "seen" : "none");
    putc('\n');
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
    probe_virtio_mmio(boot_params);
    if (cmdline_has(boot_params, "guest.hostile")) hostile_accesses();
    if (cmdline_has(boot_params, "guest.irq")) wait_for_irq(boot_params);
    blkbench_mode = cmdline_has(boot_params, "guest.blkbench");
    net_mode = cmdline_has(boot_params, "guest.net");
    if (cmdline_has(boot_params, "guest.virtio")) drive_virtio(boot_params);
    if (cmdline_has(boot_params, "guest.idle")) {
        /* Interrupts off, halted: an idle VM that ignores shutdown requests. */
        puts("idle: halting\n");
        return;
    }
    if (cmdline_has(boot_params, "guest.wait_cad")) wait_for_ctrl_alt_del();
    puts("done: resetting\n");
    i8042_reset();
}
