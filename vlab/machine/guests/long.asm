; long.asm - the 64-bit long-mode example guest.
;
; Proves: the 4-level page tables and 64-bit code segment written by vlab's
; setup_mode("long") work: 64-bit code (CS.L = 1) runs with EFER.LMA = 1 through
; identity-mapped 2 MiB pages, prints "Hello from long mode\n" on the debug console
; (port 0xE9), stores the 32-bit value 42 at guest-physical 0x400, leaves 42 in RAX
; (a 32-bit `mov` zero-extends into the full register) and halts.
; If EFER.LMA is clear it prints a complaint and stores 0xBAD.

bits 64
org 0x8000

RESULT equ 0x400
CONSOLE equ 0xE9
MSR_EFER equ 0xC0000080
EFER_LMA equ 1 << 10

start:
    cld
    lea rsi, [rel hello]
    mov ebx, 42
    mov ecx, MSR_EFER
    rdmsr                       ; edx:eax = EFER
    test eax, EFER_LMA
    jnz print
    lea rsi, [rel wrong]
    mov ebx, 0xBAD
print:
    lodsb
    test al, al
    jz done
    out CONSOLE, al
    jmp print
done:
    mov [RESULT], ebx
    mov eax, ebx
halt:
    hlt
    jmp halt

hello: db "Hello from long mode", 10, 0
wrong: db "Not in long mode: EFER.LMA is clear", 10, 0
