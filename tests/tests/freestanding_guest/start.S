/* 64-bit entry, as for a Linux vmlinux: long mode, paging on (identity map),
 * RSI = physical address of boot_params. */
    .section .text.start, "ax"
    .globl _start
_start:
    /* First thing: a port write, so the VMM can time "start to first guest
     * instruction" from its first vCPU exit. */
    movb $0x01, %al
    outb %al, $0x80
    leaq stack_top(%rip), %rsp
    movq %rsi, %rdi
    call guest_main
1:  cli
    hlt
    jmp 1b

/* Interrupt entries: save the registers C code may clobber, call the C
 * handler, return with iretq. irq_entry serves the virtio devices,
 * timer_entry the LAPIC timer. */
.macro IRQ_STUB name, handler
    .globl \name
\name:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    cld
    call \handler
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq
.endm
    IRQ_STUB irq_entry, irq_handler
    IRQ_STUB timer_entry, timer_handler

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
