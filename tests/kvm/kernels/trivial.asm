; trivial.asm - the smallest useful multiboot kernel: a flat binary whose header carries
; the a.out-kludge load addresses (flag bit 16), so no ELF is needed. Prints one line over
; COM1 and exits with EXIT_PASS (status 1). Built with `nasm -f bin`.

%include "defs.inc"

FLAT_KERNEL 0x100000

start:
    KERNEL_ENTRY bss_end
    PRINT "hello from a trivial multiboot kernel", 10
    mov eax, EXIT_PASS
    jmp exit

%include "lib.inc"
load_end:
bss_end equ load_end + 4096
