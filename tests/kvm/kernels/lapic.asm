; lapic.asm - uses the local APIC at 0xfee00000, which the in-kernel irqchip emulates
; (its MMIO never reaches userspace): checks IA32_APIC_BASE, reads the APIC ID and
; version registers, then takes APIC timer interrupts through an IDT, one-shot and then
; periodic, sleeping in HLT in between (SDM Vol. 3A 11.4, 11.5.4).

%include "defs.inc"
%define IDT_VECTORS 256

IA32_APIC_BASE  equ 0x1B
APIC_BASE_BSP   equ 1 << 8
APIC_BASE_EN    equ 1 << 11
SVR_ENABLE      equ 1 << 8
TIMER_PERIODIC  equ 1 << 17
LVT_MASKED      equ 1 << 16
TIMER_VECTOR    equ 0x40
SPURIOUS_VECTOR equ 0xFF
TIMER_COUNT     equ 1000000             ; 1 ms: KVM's APIC timer counts at 1 GHz
PERIODIC_TICKS  equ 3

KERNEL_START
    call idt_init
    SET_GATE TIMER_VECTOR, timer_interrupt
    SET_GATE SPURIOUS_VECTOR, spurious_interrupt

    mov ecx, IA32_APIC_BASE
    rdmsr
    PRINT "IA32_APIC_BASE 0x"
    call puthex
    PRINT 10
    mov ebx, eax
    and ebx, 0xFFFFF000
    cmp ebx, LAPIC
    je .base_ok
    FAIL "the local APIC is not at 0xfee00000"
.base_ok:
    and eax, APIC_BASE_BSP | APIC_BASE_EN
    cmp eax, APIC_BASE_BSP | APIC_BASE_EN
    je .bsp_ok
    FAIL "IA32_APIC_BASE lacks EN or BSP"
.bsp_ok:
    mov eax, [LAPIC_ID]
    shr eax, 24
    PRINT "APIC ID "
    call putdec
    PRINT 10
    test eax, eax
    jz .id_ok
    FAIL "the BSP's APIC ID is not 0"
.id_ok:
    mov eax, [LAPIC_VER]
    PRINT "APIC version register 0x"
    call puthex
    PRINT 10
    cmp al, 0x10                        ; 0x1X: an integrated APIC, not an 82489DX
    jae .version_ok
    FAIL "not an integrated local APIC"
.version_ok:

    mov dword [LAPIC_SVR], SVR_ENABLE | SPURIOUS_VECTOR
    mov dword [LAPIC_TIMER_DIV], 0xB    ; divide by 1
    mov dword [LAPIC_LVT_TIMER], TIMER_VECTOR
    mov dword [LAPIC_TIMER_INIT], TIMER_COUNT
.one_shot:
    sti                                 ; STI's shadow keeps the interrupt after HLT
    hlt
    cli
    cmp dword [ticks], 1
    jb .one_shot
    PRINT "APIC timer: one-shot interrupt taken", 10

    mov dword [LAPIC_LVT_TIMER], TIMER_VECTOR | TIMER_PERIODIC
    mov dword [LAPIC_TIMER_INIT], TIMER_COUNT
.periodic:
    sti
    hlt
    cli
    cmp dword [ticks], 1 + PERIODIC_TICKS
    jb .periodic
    mov dword [LAPIC_LVT_TIMER], LVT_MASKED
    PRINT "APIC timer: periodic interrupts taken", 10, "PASS", 10
    mov eax, EXIT_PASS
    jmp exit

timer_interrupt:
    inc dword [ticks]
    mov dword [LAPIC_EOI], 0
    IRETURN

spurious_interrupt:                     ; no EOI for a spurious interrupt (SDM 11.9)
    IRETURN

%include "lib.inc"

INTERRUPT_KERNEL_BSS
