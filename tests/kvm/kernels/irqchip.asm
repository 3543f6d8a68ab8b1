; irqchip.asm - the legacy interrupt path QEMU's pc machine has, here in the kernel
; (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2): programs the 8259 pair and the i8254 PIT, takes
; PIT interrupts on IRQ 0 while sleeping in HLT, and reads the IOAPIC's version register.

%include "defs.inc"
%define IDT_VECTORS 0x30

PIT_CH0   equ 0x40
PIT_CMD   equ 0x43
PIT_DIVISOR equ 1193                    ; 1.193182 MHz / 1193: about 1 kHz
TICKS     equ 5
IOAPIC_SEL equ 0xFEC00000
IOAPIC_WIN equ 0xFEC00010
IOAPIC_VER equ 1

KERNEL_START
    call idt_init
    SET_GATE IRQ_BASE, pit_interrupt
    SET_GATE IRQ_BASE + 7, spurious_irq
    SET_GATE IRQ_BASE + 15, spurious_irq

    mov dword [IOAPIC_SEL], IOAPIC_VER
    mov eax, [IOAPIC_WIN]
    PRINT "IOAPIC version register 0x"
    call puthex
    PRINT 10
    cmp al, 0x11
    je .ioapic_ok
    FAIL "IOAPIC version is not 0x11"
.ioapic_ok:

    call pic_init

    mov al, 0x34                        ; channel 0, low then high byte, mode 2 (rate)
    out PIT_CMD, al
    mov ax, PIT_DIVISOR
    out PIT_CH0, al
    mov al, ah
    out PIT_CH0, al
.wait:
    sti
    hlt
    cli
    cmp dword [ticks], TICKS
    jb .wait
    mov al, 0xFF
    out PIC1_DATA, al
    PRINT "PIT: IRQ 0 interrupts through the 8259: "
    mov eax, [ticks]
    call putdec
    PRINT 10, "PASS", 10
    mov eax, EXIT_PASS
    jmp exit

pit_interrupt:
    inc dword [ticks]
    push eax
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop eax
    IRETURN

spurious_irq:                           ; IRQ 7 or 15 with nothing in service: no EOI
    IRETURN

%include "lib.inc"

INTERRUPT_KERNEL_BSS
