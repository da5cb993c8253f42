/*
 * Specula guest CPL0 stub.
 *
 * Entered through the PVH note in 32-bit protected mode with paging off and
 * EBX = hvm_start_info (our vmm, QEMU, Cloud Hypervisor all use this path).
 * CPL0 code is emulated instruction by instruction on PVM hosts, so this stub
 * does the least it can: identity-map the RAM with 2 MiB pages (one store each),
 * fill one TSS per vCPU, enable long mode and SSE (CR4.OSFXSR|OSXMMEXCPT, no
 * FXSAVE/XSAVE), and iretq to ring 3 with IOPL=3, where all real work runs
 * natively. Every vCPU enters here (Specula SMP note); vCPU index = initial
 * APIC ID. The bootstrap vCPU builds the shared tables, the others wait.
 */
.set MAX_CPUS, 32
.set TSS_STRIDE_SHIFT, 7
.set KSTACK_SHIFT, 12
.set USTACK_SHIFT, 16
.set SEL_KCODE, 0x08
.set SEL_KDATA, 0x10
.set SEL_UDATA, 0x1b
.set SEL_UCODE, 0x23
.set SEL_TSS0, 0x28
/* e820 type the Specula inspector gives its mirror window. */
.set SPECULA_E820_MIRROR, 0x53500001

.section .note.specula, "a", @note
.balign 4
/* XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point. */
.long 4, 4, 18
.asciz "Xen"
.long _start32
.balign 4
/* Specula note 1: every vCPU may enter at the PVH entry; desc = max vCPUs. */
.long 8, 4, 1
.asciz "Specula"
.long MAX_CPUS
.balign 4
/*
 * Specula note 2: the loader may build the identity map below (the same entries this
 * stub writes) and set boot_host_tables; desc = the flag, PML4, PDPT, the first page
 * directory, and the mapped-GiB count. The stub's own loop is one emulated store per
 * 2 MiB on PVM: seconds for a large mirror window.
 */
.long 8, 20, 2
.asciz "Specula"
.long boot_host_tables, boot_pml4, boot_pdpt, __image_end, boot_mapped_gib
.balign 4

.section .text.boot, "ax"
.code32
.globl _start32
_start32:
    cli
    cld
    movl %ebx, %edi
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    movl %ebx, %esi
    cmpl $MAX_CPUS, %esi
    jae park32
    testl %esi, %esi
    jnz wait_tables

    /* The loader built the tables (and set boot_mapped_gib): only the TSSes are left. */
    cmpl $0, boot_host_tables
    jne 19f

    /*
     * Bootstrap vCPU: identity-map, with user pages, every GiB that holds
     * RAM (e820 type 1) or a Specula mirror window (type SPECULA_E820_MIRROR),
     * at least 1 GiB and at most 512 GiB: 1 GiB pages where the CPU has them,
     * else 2 MiB pages (PVM's KVM offers no 1 GiB pages).
     * There is no stack yet, so ESP serves as a counter.
     */
    movl $1, %ebp
    movl 40(%edi), %ebx
    movl 48(%edi), %esp
    cmpl $128, %esp
    jbe 1f
    movl $128, %esp
1:  testl %esp, %esp
    jz 4f
3:  movl 16(%ebx), %eax
    cmpl $1, %eax
    je 5f
    cmpl $SPECULA_E820_MIRROR, %eax
    jne 6f
5:  movl (%ebx), %eax
    movl 4(%ebx), %edx
    addl 8(%ebx), %eax
    adcl 12(%ebx), %edx
    addl $0x3fffffff, %eax
    adcl $0, %edx
    shrl $30, %eax
    shll $2, %edx
    orl %edx, %eax
    cmpl %ebp, %eax
    jbe 6f
    movl %eax, %ebp
6:  addl $24, %ebx
    decl %esp
    jnz 3b
4:  cmpl $512, %ebp
    jbe 7f
    movl $512, %ebp
7:  movl %ebp, boot_mapped_gib

    /* PML4[0] -> PDPT. */
    movl $boot_pdpt, %eax
    orl $0x7, %eax
    movl %eax, boot_pml4

    /*
     * With 1 GiB pages (CPUID 0x80000001 EDX bit 26), PDPT[g] maps the g-th GiB
     * itself: a few hundred entries whatever the mirror window's size, where
     * 2 MiB pages need 512 per GiB, each written by emulated CPL0 code on PVM
     * (seconds for a 256 GiB window).
     */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 18f
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jnc 18f
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $30, %eax
    orl $0x87, %eax
    movl %ecx, %edx
    shrl $2, %edx
    movl %eax, boot_pdpt(,%ecx,8)
    movl %edx, boot_pdpt+4(,%ecx,8)
    incl %ecx
    cmpl %ebp, %ecx
    jb 1b
    jmp 19f

    /* Otherwise PDPT[g] -> the g-th page directory, placed after the image. */
18: xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $__image_end, %eax
    orl $0x7, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    movl $0, boot_pdpt+4(,%ecx,8)
    incl %ecx
    cmpl %ebp, %ecx
    jb 1b
    shll $9, %ebp
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax
    movl %ecx, %edx
    shrl $11, %edx
    movl %eax, __image_end(,%ecx,8)
    movl %edx, __image_end+4(,%ecx,8)
    incl %ecx
    cmpl %ebp, %ecx
    jb 1b
19:

    /*
     * One 64-bit TSS per vCPU: RSP0 = its kernel stack. All TSSes share one
     * all-zero I/O permission bitmap placed right after them: PVM checks the
     * bitmap of a loaded TSS even at IOPL=3, so every port must be allowed.
     */
    movb $0xff, io_bitmap + 8192
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $TSS_STRIDE_SHIFT, %eax
    movl $(io_bitmap - tss_array), %ebp
    subl %eax, %ebp
    addl $tss_array, %eax
    movl %ecx, %edx
    incl %edx
    shll $KSTACK_SHIFT, %edx
    addl $kernel_stacks, %edx
    movl %edx, 4(%eax)
    movl $0, 8(%eax)
    movw %bp, 102(%eax)
    addl $8192, %ebp
    movl %ecx, %edx
    shll $4, %edx
    addl $(gdt_start + SEL_TSS0), %edx
    movl %eax, %ebx
    shll $16, %ebx
    orl %ebp, %ebx
    movl %ebx, (%edx)
    movl %eax, %ebx
    shrl $16, %ebx
    andl $0xff, %ebx
    orl $0x8900, %ebx
    movl %eax, %ebp
    andl $0xff000000, %ebp
    orl %ebp, %ebx
    movl %ebx, 4(%edx)
    movl $0, 8(%edx)
    movl $0, 12(%edx)
    incl %ecx
    cmpl $MAX_CPUS, %ecx
    jb 2b
    movl $1, boot_tables_ready
    jmp enter_long

wait_tables:
    pause
    cmpl $1, boot_tables_ready
    jne wait_tables

enter_long:
    lgdt gdt_ptr
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    ljmp $SEL_KCODE, $start64

park32:
    hlt
    jmp park32

.code64
start64:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi
    movl %esi, %esi

    movl %esi, %eax
    incl %eax
    shll $KSTACK_SHIFT, %eax
    leaq kernel_stacks(%rip), %rdx
    addq %rdx, %rax
    movq %rax, %rsp

    movl %esi, %eax
    shll $4, %eax
    addl $SEL_TSS0, %eax
    ltr %ax

    movl %esi, %eax
    incl %eax
    shlq $USTACK_SHIFT, %rax
    leaq user_stacks(%rip), %rdx
    addq %rdx, %rax
    subq $8, %rax
    pushq $SEL_UDATA
    pushq %rax
    pushq $0x3002
    pushq $SEL_UCODE
    leaq specula_ring3_entry(%rip), %rax
    pushq %rax
    iretq

.section .data
.balign 16
gdt_start:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .fill MAX_CPUS * 2, 8, 0
gdt_end:
.balign 8
gdt_ptr:
    .word gdt_end - gdt_start - 1
    .long gdt_start
    .long 0
.balign 4
boot_tables_ready:
    .long 0
.globl boot_mapped_gib
boot_mapped_gib:
    .long 0
/* Set to 1 by a loader that built the page tables (Specula note 2). */
.globl boot_host_tables
boot_host_tables:
    .long 0

.section .bss.boot_tables, "aw", @nobits
.balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
tss_array:
    .skip 128 * MAX_CPUS
io_bitmap:
    .skip 8192 + 1
.balign 4096
kernel_stacks:
    .skip 4096 * MAX_CPUS
user_stacks:
    .skip 65536 * MAX_CPUS
