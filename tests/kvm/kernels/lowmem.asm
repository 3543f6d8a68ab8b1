; lowmem.asm - a flat kernel loaded at 0x8000 whose text and bss run past 0xa000, over
; QEMU's multiboot information address 0x9000. Checks that the information structure it is
; handed lies outside its own image, that its memory map and command line are sound, and
; that its own bytes arrived intact. Built with `nasm -f bin`.

%include "defs.inc"

LOAD_ADDR equ 0x8000
PATTERN   equ 0x10AD10AD

FLAT_KERNEL LOAD_ADDR

start:
    KERNEL_ENTRY bss_end
    PRINT "low kernel at 0x8000-0x"
    mov eax, bss_end - 1
    call puthex
    PRINT ", multiboot information at 0x"
    mov eax, [boot_ebx]
    call puthex
    PRINT 10
    cmp dword [boot_eax], MB_BOOTLOADER_MAGIC
    je .magic_ok
    FAIL "EAX is not 0x2BADB002"
.magic_ok:
    mov ebx, [boot_ebx]
    cmp ebx, bss_end
    jae .outside
    cmp ebx, LOAD_ADDR - 88
    jbe .outside
    FAIL "the information structure lies inside the kernel"
.outside:
    mov esi, pattern                    ; the kernel's bytes over 0x9000 are its own
    mov ecx, (pattern_end - pattern) / 4
.compare:
    cmp dword [esi], PATTERN
    jne .clobbered
    add esi, 4
    loop .compare
    cmp dword [ebx + MBI_MEM_LOWER], 639
    jne .bad_info
    test dword [ebx + MBI_FLAGS], MBI_HAS_CMDLINE
    jz .bad_info
    call cmdline_args
    PRINT "args='"
    call puts
    PRINT "'", 10, "PASS", 10
    mov eax, EXIT_PASS
    jmp exit
.clobbered:
    FAIL "the kernel's own bytes over 0x9000 were overwritten"
.bad_info:
    FAIL "the information structure is not sound"

%include "lib.inc"

align 4
pattern:                                ; from below 0x9000 to past 0x9600
    times (0x9600 - 0x8000 - ($ - $$)) / 4 + 0x40 dd PATTERN
pattern_end:
load_end:
bss_end equ 0xA86C                      ; the kernel of the report: 0x8000-0xa86b
