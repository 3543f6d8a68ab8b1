; protected.asm - the 32-bit protected-mode example guest.
;
; Proves: the GDT and flat 4 GiB segments written by vlab's setup_mode("protected")
; work: 32-bit code runs with CR0.PE = 1 and paging off, reads its message through DS,
; prints "Hello from protected mode\n" on the debug console (port 0xE9, one `out` per
; byte), stores the 32-bit value 42 at guest-physical 0x400, leaves 42 in EAX and halts.
; If CR0 shows another mode (PE clear or PG set) it prints a complaint and stores 0xBAD.

bits 32
org 0x8000

RESULT equ 0x400
CONSOLE equ 0xE9
CR0_PE equ 1 << 0
CR0_PG equ 1 << 31

start:
    cld
    mov esi, hello
    mov ebx, 42
    mov eax, cr0
    and eax, CR0_PE | CR0_PG
    cmp eax, CR0_PE             ; protected, not paged
    je print
    mov esi, wrong
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

hello: db "Hello from protected mode", 10, 0
wrong: db "Not in protected mode: CR0.PE must be 1 and CR0.PG 0", 10, 0
