//! Entry points, page tables, GDT and the PVH ELF note (assembly only).
//!
//! - `pvh_start32`: the PVH entry named by the `XEN_ELFNOTE_PHYS32_ENTRY` note. 32-bit protected
//!   mode, paging off, `ebx` = `hvm_start_info`. It identity-maps the low 1 GiB, enables
//!   PAE + long mode + paging + SSE, loads the GDT below and continues at `_start` with `rsi` = start info.
//! - `_start` (`e_entry`): 64-bit mode with the low 1 GiB identity-mapped, `rsi` = start info. It
//!   zeroes `.bss`, builds its own tables that identity-map the low 4 GiB (device MMIO and the
//!   local APIC live up there), loads its own GDT and stack and calls `guest_main(start_info)`.
//!
//! Nothing here relies on memory outside the image: whatever page tables, GDT or stack the
//! loader used are abandoned, so the loader's only duties are the ones in the boot contract.

use core::arch::global_asm;

global_asm!(
    r#"
    .pushsection .note.pvh, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz: QEMU reads the entry as a 64-bit value */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi

    /* Zero the three trampoline tables, then map the low 1 GiB with 2 MiB pages. */
    mov $boot_pml4, %edi
    xor %eax, %eax
    mov $(3 * 1024), %ecx
    rep stosl
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax         /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xC0000080, %ecx   /* EFER */
    rdmsr
    or $0x100, %eax         /* LME */
    wrmsr
    mov %cr0, %eax
    and $~0x4, %eax         /* no x87 emulation */
    or $0x80000003, %eax    /* PG | MP | PE */
    mov %eax, %cr0
    lgdt gdt_descriptor
    ljmp $0x08, $pvh_long_mode

    .code64
pvh_long_mode:
    mov %esi, %esi          /* the upper halves are undefined after the mode switch */
    jmp _start

    .global _start
_start:
    cli
    cld
    mov %rsi, %r15

    /* Zero .bss: it holds the stack and the page tables below. */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    xor %eax, %eax
    rep stosq

    /* Identity-map the low 4 GiB with 2 MiB pages; the top GiB (MMIO) uncached. */
    lea pdpt(%rip), %rax
    or $0x3, %rax
    mov %rax, pml4(%rip)
    lea pd(%rip), %rax
    or $0x3, %rax
    lea pdpt(%rip), %rdi
    mov $4, %ecx
2:  mov %rax, (%rdi)
    add $4096, %rax
    add $8, %rdi
    dec %ecx
    jnz 2b
    lea pd(%rip), %rdi
    xor %ecx, %ecx
3:  mov %rcx, %rax
    shl $21, %rax
    or $0x83, %rax
    cmp $1536, %ecx
    jb 4f
    or $0x18, %rax
4:  mov %rax, (%rdi,%rcx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 3b
    lea pml4(%rip), %rax
    mov %rax, %cr3

    lgdt gdt_descriptor(%rip)
    lea stack_top(%rip), %rsp
    pushq $0x08
    lea 5f(%rip), %rax
    push %rax
    lretq
5:  mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs

    mov %cr0, %rax
    and $~0x4, %rax
    or $0x2, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $0x600, %rax
    mov %rax, %cr4

    mov %r15, %rdi
    call guest_main
6:  cli
    hlt
    jmp 6b
    .popsection

    .pushsection .data.gdt, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: flat data */
gdt_end:
    .balign 8
gdt_descriptor:
    .word gdt_end - gdt - 1
    .quad gdt
    .popsection

    .pushsection .pvh_tables, "aw", @nobits
    .balign 4096
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
    .popsection

    .pushsection .bss.page_tables, "aw", @nobits
    .balign 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4 * 4096
    .popsection

    .pushsection .bss.stack, "aw", @nobits
    .balign 16
stack_bottom: .skip 0x10000
stack_top:
    .popsection
"#,
    options(att_syntax)
);

/// The code segment selector of the GDT above (used by the IDT).
pub const CODE_SELECTOR: u16 = 0x08;
