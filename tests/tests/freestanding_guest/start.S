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

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
