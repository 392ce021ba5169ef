/* Minimal virtio-mmio (version 2, no legacy) drivers for the freestanding
 * guest: split virtqueues in the guest's .bss, one page each, feature
 * negotiation (VIRTIO_F_VERSION_1 only), and bounded waits that halt until
 * an interrupt (the device's, or the LAPIC timer's tick) arrives. */
#pragma once
#include "io.h"

#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_AVAIL_LOW 0x090
#define VMMIO_QUEUE_AVAIL_HIGH 0x094
#define VMMIO_QUEUE_USED_LOW 0x0a0
#define VMMIO_QUEUE_USED_HIGH 0x0a4
#define VMMIO_CONFIG 0x100

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19

#define ST_ACKNOWLEDGE 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8

#define VQ_SIZE 8
#define VQ_MAX 16
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

/* Layout inside a queue's page: descriptor table at 0, available ring at
 * 0x200, used ring at 0x400 (all aligned as virtio 1.2 2.7 asks). */
struct vq {
    u64 base;  /* the device's MMIO window */
    u32 index; /* queue index in the device */
    u8 *page;
    u16 next_avail;
    u16 last_used;
};

static u8 vq_pages[VQ_MAX][4096] __attribute__((aligned(4096)));
static u32 vq_pages_used;

static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline volatile u64 *vq_desc(struct vq *q, u16 i) { return (volatile u64 *)(q->page + 16 * i); }

static void vq_set_desc(struct vq *q, u16 i, const volatile void *addr, u32 len, u16 flags, u16 next) {
    volatile u8 *d = q->page + 16 * i;
    *(volatile u64 *)d = (u64)addr;
    *(volatile u32 *)(d + 8) = len;
    *(volatile u16 *)(d + 12) = flags;
    *(volatile u16 *)(d + 14) = next;
}

static inline volatile u16 *vq_avail(struct vq *q) { return (volatile u16 *)(q->page + 0x200); }
static inline volatile u16 *vq_used(struct vq *q) { return (volatile u16 *)(q->page + 0x400); }

/* Makes the chain starting at `head` available (no notification). */
static void vq_push(struct vq *q, u16 head) {
    volatile u16 *avail = vq_avail(q);
    avail[2 + q->next_avail % VQ_SIZE] = head;
    barrier();
    q->next_avail++;
    avail[1] = q->next_avail;
    barrier();
}

static void vq_notify(struct vq *q) {
    barrier();
    mmio_write32(q->base + VMMIO_QUEUE_NOTIFY, q->index);
}

/* Takes one used element, if any: returns 1 and its id and length. */
static int vq_pop(struct vq *q, u32 *id, u32 *len) {
    volatile u16 *used = vq_used(q);
    if (used[1] == q->last_used) return 0;
    barrier();
    volatile u32 *elem = (volatile u32 *)(q->page + 0x400 + 4 + 8 * (q->last_used % VQ_SIZE));
    *id = elem[0];
    *len = elem[1];
    q->last_used++;
    return 1;
}

/* Interrupt plumbing lives in main.c: counts of device interrupts and
 * timer ticks, and the bounded halt. */
extern volatile u32 irq_count;
extern volatile u32 tick_count;
/* Halts until the next interrupt; returns 0 once the wait budget (in
 * LAPIC timer ticks) is spent, so no wait can hang the guest forever. */
static int idle_wait(u32 deadline) {
    if (tick_count >= deadline) return 0;
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    return 1;
}

/* ~1 ms ticks: every wait gives up after 20 s. */
#define WAIT_TICKS 20000

static int vq_wait_ticks(struct vq *q, u32 *id, u32 *len, u32 ticks) {
    u32 deadline = tick_count + ticks;
    while (!vq_pop(q, id, len))
        if (!idle_wait(deadline)) return 0;
    return 1;
}

static int vq_wait(struct vq *q, u32 *id, u32 *len) { return vq_wait_ticks(q, id, len, WAIT_TICKS); }

struct vdev {
    u64 base;
    u32 gsi;
    u32 id;
    u32 nq;
    struct vq q[3];
};

/* Acknowledges whatever the device signalled (used buffers, config change). */
static u32 vdev_ack(struct vdev *d) {
    u32 s = mmio_read32(d->base + VMMIO_INTERRUPT_STATUS);
    if (s) mmio_write32(d->base + VMMIO_INTERRUPT_ACK, s);
    return s;
}

/* The status sequence of virtio 1.2 3.1.1 up to FEATURES_OK and queue set-up;
 * returns 0 on success, else a step number. The caller posts buffers and
 * then calls vdev_ready. */
static int vdev_init(struct vdev *d, u32 nq) {
    u64 b = d->base;
    if (mmio_read32(b + VMMIO_MAGIC) != 0x74726976 || mmio_read32(b + VMMIO_VERSION) != 2) return 1;
    if (nq > 3 || vq_pages_used + nq > VQ_MAX) return 2;
    d->nq = nq;
    mmio_write32(b + VMMIO_STATUS, 0);
    mmio_write32(b + VMMIO_STATUS, ST_ACKNOWLEDGE);
    mmio_write32(b + VMMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    mmio_write32(b + VMMIO_DEVICE_FEATURES_SEL, 1);
    if (!(mmio_read32(b + VMMIO_DEVICE_FEATURES) & 1)) return 3; /* VIRTIO_F_VERSION_1 */
    mmio_write32(b + VMMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(b + VMMIO_DRIVER_FEATURES, 0);
    mmio_write32(b + VMMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(b + VMMIO_DRIVER_FEATURES, 1);
    mmio_write32(b + VMMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(mmio_read32(b + VMMIO_STATUS) & ST_FEATURES_OK)) return 4;
    for (u32 i = 0; i < nq; i++) {
        struct vq *q = &d->q[i];
        q->base = b;
        q->index = i;
        q->page = vq_pages[vq_pages_used++];
        q->next_avail = 0;
        q->last_used = 0;
        mmio_write32(b + VMMIO_QUEUE_SEL, i);
        if (mmio_read32(b + VMMIO_QUEUE_NUM_MAX) < VQ_SIZE) return 5;
        u64 desc = (u64)q->page, avail = desc + 0x200, used = desc + 0x400;
        mmio_write32(b + VMMIO_QUEUE_NUM, VQ_SIZE);
        mmio_write32(b + VMMIO_QUEUE_DESC_LOW, (u32)desc);
        mmio_write32(b + VMMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
        mmio_write32(b + VMMIO_QUEUE_AVAIL_LOW, (u32)avail);
        mmio_write32(b + VMMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
        mmio_write32(b + VMMIO_QUEUE_USED_LOW, (u32)used);
        mmio_write32(b + VMMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
        mmio_write32(b + VMMIO_QUEUE_READY, 1);
    }
    return 0;
}

static int vdev_ready(struct vdev *d) {
    mmio_write32(d->base + VMMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    return (mmio_read32(d->base + VMMIO_STATUS) & 0x40) ? 6 : 0; /* NEEDS_RESET */
}

static u64 vdev_config64(struct vdev *d, u32 off) {
    u64 lo = mmio_read32(d->base + VMMIO_CONFIG + off);
    u64 hi = mmio_read32(d->base + VMMIO_CONFIG + off + 4);
    return lo | hi << 32;
}

/* FNV-1a, 32 bits: the checksum the host recomputes over the same bytes. */
static u32 fnv1a(const volatile u8 *p, u32 n) {
    u32 h = 0x811c9dc5;
    for (u32 i = 0; i < n; i++) h = (h ^ p[i]) * 0x01000193;
    return h;
}

/* ---- virtio-blk ---- */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4

static struct { u32 type, reserved; u64 sector; } blk_hdr __attribute__((aligned(16)));
static volatile u8 blk_status;

/* One request (header, optional data, status): returns the status byte,
 * or 0xff when the device never answered. */
static u8 blk_request(struct vdev *d, u32 type, u64 sector, volatile void *buf, u32 len) {
    struct vq *q = &d->q[0];
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    vq_set_desc(q, 0, &blk_hdr, sizeof(blk_hdr), DESC_F_NEXT, 1);
    if (len) {
        vq_set_desc(q, 1, buf, len, DESC_F_NEXT | (type == BLK_T_IN ? DESC_F_WRITE : 0), 2);
        vq_set_desc(q, 2, &blk_status, 1, DESC_F_WRITE, 0);
    } else {
        vq_set_desc(q, 1, &blk_status, 1, DESC_F_WRITE, 0);
    }
    vq_push(q, 0);
    vq_notify(q);
    u32 id, used_len;
    if (!vq_wait(q, &id, &used_len)) return 0xff;
    return blk_status;
}

/* ---- virtio-vsock ---- */
#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_HDR 44
#define VSOCK_BUF 4096

struct __attribute__((packed)) vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
};
