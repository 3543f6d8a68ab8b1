; module.asm - lists the boot modules the loader placed (Multiboot spec 3.3, mods_addr):
; for each, its string, address, length, a byte sum, and its first line, so a test can
; check that the bytes arrived intact. Asks for page-aligned modules and checks that.

%include "defs.inc"

MOD_START  equ 0
MOD_END    equ 4
MOD_STRING equ 8
MOD_SIZE   equ 16
FIRST_LINE_MAX equ 64

KERNEL_START
    mov ebx, [boot_ebx]
    test dword [ebx + MBI_FLAGS], MBI_HAS_MODS
    jnz .has_mods
    FAIL "the info flags lack the module list"
.has_mods:
    mov ecx, [ebx + MBI_MODS_CNT]
    PRINT "modules: "
    mov eax, ecx
    call putdec
    PRINT 10
    test ecx, ecx
    jnz .listed
    FAIL "no module was passed"
.listed:
    mov edi, [ebx + MBI_MODS_ADDR]
.module:
    PRINT "module '"
    mov esi, [edi + MOD_STRING]
    call puts
    PRINT "' at 0x"
    mov eax, [edi + MOD_START]
    call puthex
    PRINT " length "
    mov eax, [edi + MOD_END]
    sub eax, [edi + MOD_START]
    call putdec
    PRINT " sum 0x"
    call module_sum
    call puthex
    PRINT 10
    test dword [edi + MOD_START], 0xFFF
    jz .aligned
    FAIL "a module is not page-aligned"
.aligned:
    PRINT "first line: "
    call first_line
    PRINT 10
    add edi, MOD_SIZE
    dec ecx
    jnz .module
    PRINT "PASS", 10
    mov eax, EXIT_PASS
    jmp exit

; module_sum: EAX = the sum of the bytes of the module at EDI, modulo 2^32.
module_sum:
    push esi
    push edx
    mov esi, [edi + MOD_START]
    xor eax, eax
.byte:
    cmp esi, [edi + MOD_END]
    jae .done
    movzx edx, byte [esi]
    add eax, edx
    inc esi
    jmp .byte
.done:
    pop edx
    pop esi
    ret

; first_line: print the module's bytes up to the first newline (at most FIRST_LINE_MAX).
first_line:
    push esi
    push ecx
    push eax
    mov esi, [edi + MOD_START]
    mov ecx, FIRST_LINE_MAX
.char:
    cmp esi, [edi + MOD_END]
    jae .done
    mov al, [esi]
    cmp al, 10
    je .done
    call putc
    inc esi
    loop .char
.done:
    pop eax
    pop ecx
    pop esi
    ret

%include "lib.inc"

section .bss
alignb 16
    resb 4096
stack_top:
