; paged.asm - the 32-bit paged example guest.
;
; Proves: the page directory written by vlab's setup_mode("paged") works: with
; CR0.PG = 1 and CR4.PSE = 1 every fetch, read and write below goes through 4 MiB
; identity-mapped pages (a missing or wrong entry would fault, and with no IDT the
; fault becomes a triple fault, KVM_EXIT_SHUTDOWN). It prints "Hello from paged mode\n"
; on the debug console (port 0xE9), stores the 32-bit value 42 at guest-physical 0x400
; (virtual 0x400: the mapping is the identity), leaves 42 in EAX and halts.
; If CR0.PG or CR4.PSE is clear it prints a complaint and stores 0xBAD.

bits 32
org 0x8000

RESULT equ 0x400
CONSOLE equ 0xE9
CR0_PE equ 1 << 0
CR0_PG equ 1 << 31
CR4_PSE equ 1 << 4

start:
    cld
    mov esi, hello
    mov ebx, 42
    mov eax, cr0
    and eax, CR0_PE | CR0_PG
    cmp eax, CR0_PE | CR0_PG
    jne wrong_mode
    mov eax, cr4
    test eax, CR4_PSE
    jnz print
wrong_mode:
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

hello: db "Hello from paged mode", 10, 0
wrong: db "Not in paged mode: CR0.PE, CR0.PG and CR4.PSE must be 1", 10, 0
