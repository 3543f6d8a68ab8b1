; smp.asm - the bootstrap processor starts every application processor the way the SDM's
; MP initialization protocol does (Vol. 3A 8.4.4): a real-mode trampoline copied below
; 1 MiB, then INIT, start-up IPI, start-up IPI through the local APIC's ICR, one AP at a
; time. Each AP wakes in real mode at the trampoline's page (the SIPI vector), enters
; protected mode with the kernel's GDT, reads its APIC ID, says "AP up", counts itself in
; and halts. The CPU count comes from fw_cfg; the BSP exits with a pass once all are up.

%include "defs.inc"

TRAMPOLINE   equ 0x8000                 ; 4 KiB-aligned, below 1 MiB: SIPI vector 0x08
ICR_INIT     equ 0x00004500             ; INIT, level assert
ICR_STARTUP  equ 0x00004600             ; start-up; the low byte is the vector
ICR_BUSY     equ 1 << 12                ; delivery status: send pending
FW_CFG_NB_CPUS equ 0x05
WAIT_LOOPS   equ 0x400000               ; how long the BSP waits for one AP
SVR_ENABLE   equ 1 << 8
SPURIOUS_VECTOR equ 0xFF

KERNEL_START
    mov esi, trampoline
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline
    rep movsb

    mov ax, FW_CFG_NB_CPUS
    call fw_cfg_select
    mov ecx, 2
    call fw_cfg_read
    mov [cpus], eax
    PRINT "BSP: "
    call putdec
    PRINT " CPUs", 10

    ; SDM 8.4.4.1 enables the local APIC (SVR bit 8) before sending INIT; measured on
    ; kvm_pvm, an INIT sent from a software-disabled APIC never reaches the AP.
    mov dword [LAPIC_SVR], SVR_ENABLE | SPURIOUS_VECTOR
    mov ebx, 1                          ; APIC IDs are the vCPU indices 1 .. cpus-1
.next_ap:
    cmp ebx, [cpus]
    jae .all_up
    PRINT "BSP: INIT, SIPI, SIPI to APIC ID "
    mov eax, ebx
    call putdec
    PRINT 10
    mov eax, ebx
    shl eax, 24
    mov [LAPIC_ICR_HI], eax
    mov eax, ICR_INIT
    call send_ipi
    mov eax, ICR_STARTUP | (TRAMPOLINE >> 12)
    call send_ipi
    mov eax, ICR_STARTUP | (TRAMPOLINE >> 12)
    call send_ipi
    mov ecx, WAIT_LOOPS
.wait:
    cmp [aps_up], ebx
    je .up
    pause
    loop .wait
    FAIL "an AP did not come up"
.up:
    inc ebx
    jmp .next_ap
.all_up:
    PRINT "BSP: all APs up", 10
    mov eax, [aps_up]
    inc eax
    cmp eax, [cpus]
    je .pass
    FAIL "more APs counted themselves in than were started"
.pass:
    PRINT "PASS", 10
    mov eax, EXIT_PASS
    jmp exit

; send_ipi: write EAX to the ICR's low half (which sends) and wait until delivered.
send_ipi:
    mov [LAPIC_ICR_LO], eax
.busy:
    test dword [LAPIC_ICR_LO], ICR_BUSY
    jnz .busy
    ret

; The AP's first instructions, run from the copy at TRAMPOLINE: CS = TRAMPOLINE >> 4,
; IP = 0, real mode. Data in the copy is addressed relative to its start.
bits 16
trampoline:
    cli
    mov ax, cs
    mov ds, ax
    o32 lgdt [trampoline_gdt - trampoline]
    mov eax, cr0
    or eax, 1                           ; CR0.PE
    mov cr0, eax
    jmp dword CODE_SEL:ap_main          ; into the kernel's 32-bit code above 1 MiB
align 4
trampoline_gdt:
    dw gdt_end - gdt - 1
    dd gdt
trampoline_end:
bits 32

ap_main:
    mov ax, DATA_SEL
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, ap_stack_top               ; one AP runs at a time: one stack serves all
    PRINT "AP up: APIC ID "
    mov eax, [LAPIC_ID]
    shr eax, 24
    call putdec
    PRINT 10
    lock inc dword [aps_up]
.halt:
    hlt
    jmp .halt

%include "lib.inc"

section .bss
cpus: resd 1
aps_up: resd 1
alignb 16
    resb 4096
stack_top:
    resb 4096
ap_stack_top:
