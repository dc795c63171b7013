/* Entry points of the husk test guest (Intel syntax, assembled by rustc's global_asm!). */

/* PVH: XEN_ELFNOTE_PHYS32_ENTRY. Kept or discarded by the linker script. */
.section .husk_pvh_note, "a"
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.long pvh_start32

.section .text.entry, "ax"
.code32
.global pvh_start32
pvh_start32:
    mov edi, ebx
    mov esp, 0x180000
    mov dx, 0x440
    mov al, 1
    out dx, al
    /* Identity map with 2 MiB pages only what the guest touches (kept short: in 32-bit mode
       the kvm-pvm host emulates each instruction): 0-128 MiB, the virtio MMIO window at
       0xd0000000 and the IOAPIC/LAPIC at 0xfec00000/0xfee00000. */
    mov dword ptr [0x190000], 0x191003
    mov dword ptr [0x191000], 0x192003
    mov dword ptr [0x191018], 0x195003
    xor ecx, ecx
    mov eax, 0x83
2:
    mov dword ptr [0x192000 + ecx*8], eax
    add eax, 0x200000
    inc ecx
    cmp ecx, 64
    jne 2b
    mov dword ptr [0x195000 + 128*8], 0xd0000083
    mov dword ptr [0x195000 + 502*8], 0xfec00083
    mov dword ptr [0x195000 + 503*8], 0xfee00083
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, 0x190000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    and eax, 0xfffffffb
    mov cr0, eax
    lgdt [guest_gdt_ptr]
    push 0x08
    mov eax, offset start64_from_pvh
    push eax
    retf

.code64
start64_from_pvh:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x180000
    mov esi, edi
    mov edi, 1
    call guest_main
3:
    hlt
    jmp 3b

/* Linux boot protocol 64-bit entry: rsi = zero page. In the bzImage build this section
   is placed at load address + 0x200, where the 64-bit boot protocol enters. */
.section .text.start64, "ax"
.global _start64
_start64:
    mov dx, 0x440
    mov al, 2
    out dx, al
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    mov rsp, 0x180000
    mov edi, 2
    call guest_main
4:
    hlt
    jmp 4b

.section .text.entry, "ax"

/* Interrupt handler for vector 0x30: count, EOI the local APIC. */
.global irq_handler
irq_handler:
    push rax
    mov rax, 0x1a1000
    inc dword ptr [rax]
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rax
    iretq

/* Application-processor trampoline, copied to 0x8000 (SIPI vector 8). Real mode. */
.code16
.global ap_tramp_start
.global ap_tramp_end
ap_tramp_start:
    cli
    mov ax, cs
    mov ds, ax
    inc word ptr [0x100]
5:
    hlt
    jmp 5b
ap_tramp_end:

.code64
.section .rodata.gdt, "a"
.balign 16
guest_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
guest_gdt_ptr:
    .word 23
    .long guest_gdt
