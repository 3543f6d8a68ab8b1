; hello.asm - says hello over COM1 and checks what the boot loader handed over:
; EAX = 0x2BADB002, A20 on, the information structure's flags, mem_lower/mem_upper
; against the memory map (page 0 must be usable RAM), and a command line that is always
; a string. Exits with EXIT_PASS, or with the digit N of an "exit=N" on the command line,
; so a test can see any status pass through.

%include "defs.inc"

NEEDED equ MBI_HAS_MEM | MBI_HAS_CMDLINE | MBI_HAS_MMAP
MMAP_AVAILABLE equ 1

KERNEL_START
    PRINT "hello from a multiboot kernel", 10
    cmp dword [boot_eax], MB_BOOTLOADER_MAGIC
    je .magic_ok
    FAIL "EAX is not 0x2BADB002"
.magic_ok:
    ; A20: were address bit 20 masked, writing 1 MiB below the probe would overwrite it.
    mov dword [a20_probe], 0xA20A20
    mov dword [a20_probe - 0x100000], 0
    cmp dword [a20_probe], 0xA20A20
    je .a20_on
    FAIL "A20 is off: memory wraps at 1 MiB"
.a20_on:
    PRINT "A20 on", 10
    mov ebx, [boot_ebx]
    mov eax, [ebx + MBI_FLAGS]
    and eax, NEEDED
    cmp eax, NEEDED
    je .flags_ok
    FAIL "the info flags lack memory, cmdline or mmap"
.flags_ok:
    PRINT "mem_lower="
    mov eax, [ebx + MBI_MEM_LOWER]
    call putdec
    PRINT " KiB mem_upper="
    mov eax, [ebx + MBI_MEM_UPPER]
    call putdec
    PRINT " KiB", 10

    ; Walk the memory map: each entry is `size` then size bytes (base, length, type).
    mov esi, [ebx + MBI_MMAP_ADDR]
    mov edi, esi
    add edi, [ebx + MBI_MMAP_LEN]
.entry:
    cmp esi, edi
    jae .mmap_done
    PRINT "mmap base=0x"
    mov eax, [esi + 4]
    call puthex
    PRINT " length=0x"
    mov eax, [esi + 12]
    call puthex
    PRINT " type="
    mov eax, [esi + 20]
    call putdec
    PRINT 10
    cmp dword [esi + 20], MMAP_AVAILABLE
    jne .next
    cmp dword [esi + 4], 0
    jne .not_page0
    inc dword [page0_usable]
.not_page0:
    cmp dword [esi + 4], 0x100000       ; upper memory: must agree with mem_upper
    jne .next
    mov eax, [esi + 12]
    shr eax, 10
    cmp eax, [ebx + MBI_MEM_UPPER]
    je .upper_ok
    FAIL "mem_upper disagrees with the memory map"
.upper_ok:
    inc dword [upper_found]
.next:
    add esi, [esi]
    add esi, 4
    jmp .entry
.mmap_done:
    cmp dword [page0_usable], 1
    je .page0_ok
    FAIL "the memory map does not make page 0 usable RAM"
.page0_ok:
    cmp dword [upper_found], 1
    je .cmdline
    FAIL "the memory map has no RAM at 1 MiB"

.cmdline:
    mov esi, [ebx + MBI_CMDLINE]
    PRINT "cmdline='"
    call puts
    PRINT "'", 10
    mov eax, EXIT_PASS
.scan:                                  ; look for "exit=N"
    cmp byte [esi], 0
    je .exit
    cmp dword [esi], "exit"
    jne .advance
    cmp byte [esi + 4], "="
    jne .advance
    movzx eax, byte [esi + 5]
    sub eax, "0"
    cmp eax, 9
    jbe .exit
    FAIL "exit=N needs a digit N"
.advance:
    inc esi
    jmp .scan
.exit:
    test eax, eax
    jnz exit
    PRINT "PASS", 10
    jmp exit

%include "lib.inc"

section .bss
page0_usable: resd 1                    ; .bss: the loader must have zeroed these
upper_found: resd 1
a20_probe: resd 1                       ; its alias 1 MiB below is free low memory
alignb 16
    resb 4096
stack_top:
