; real.asm - the real-mode example guest.
;
; Proves: the vCPU runs 16-bit code in real mode (CR0.PE = 0) at the address the VMM
; chose, with CS = DS = 0 as vlab's setup_mode("real") leaves them, and that port I/O
; and guest memory work: it prints "Hello from real mode\n" on the debug console
; (port 0xE9, one `out` per byte, each a KVM_EXIT_IO), stores the 32-bit value 42 at
; guest-physical 0x400, leaves 42 in EAX and halts (KVM_EXIT_HLT).
; If CR0.PE is set it prints a complaint and stores 0xBAD instead.

bits 16
org 0x8000

RESULT equ 0x400                ; guest-physical address of the result
CONSOLE equ 0xE9                ; debug console port (QEMU's -debugcon, Bochs' port E9)

start:
    cld                         ; lodsb walks upwards
    mov si, hello
    mov ebx, 42
    smsw ax                     ; the low 16 bits of CR0, readable in any mode
    test al, 1                  ; CR0.PE
    jz print
    mov si, wrong
    mov ebx, 0xBAD
print:
    lodsb                       ; al = [ds:si++]
    test al, al
    jz done
    out CONSOLE, al
    jmp print
done:
    mov [RESULT], ebx
    mov eax, ebx
halt:
    hlt
    jmp halt                    ; stay halted if something wakes the vCPU

hello: db "Hello from real mode", 10, 0
wrong: db "Not in real mode: CR0.PE is set", 10, 0
