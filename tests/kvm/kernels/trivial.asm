; trivial.asm - the smallest useful multiboot kernel: a flat binary whose header carries
; the a.out-kludge load addresses (flag bit 16), so no ELF is needed. Prints one line over
; COM1 and exits with EXIT_PASS (status 1). Built with `nasm -f bin`.

%include "defs.inc"

LOAD_ADDR equ 0x100000
FLAGS     equ MB_MEMORY_INFO | MB_AOUT_KLUDGE

bits 32
org LOAD_ADDR

header:
    dd MB_HEADER_MAGIC, FLAGS, -(MB_HEADER_MAGIC + FLAGS)
    dd header                           ; header_addr
    dd LOAD_ADDR                        ; load_addr
    dd load_end                         ; load_end_addr
    dd bss_end                          ; bss_end_addr: the stack lies in the zeroed part
    dd start                            ; entry_addr

start:
    KERNEL_ENTRY bss_end
    PRINT "hello from a trivial multiboot kernel", 10
    mov eax, EXIT_PASS
    jmp exit

%include "lib.inc"
load_end:
bss_end equ load_end + 4096
