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

/* Interrupt entry for every vector the guest uses: saves the registers C
 * code may clobber, calls irq_handler, returns with iretq. */
    .globl irq_entry
irq_entry:
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
    call irq_handler
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

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
