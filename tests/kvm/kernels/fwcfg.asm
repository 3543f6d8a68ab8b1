; fwcfg.asm - reads QEMU's fw_cfg through its legacy I/O ports: the "QEMU" signature,
; the RAM size and the CPU count (docs/specs/fw_cfg.rst), prints them, and checks the RAM
; size against the Multiboot information's mem_upper.

%include "defs.inc"

FW_CFG_SIGNATURE equ 0x00
FW_CFG_RAM_SIZE  equ 0x03
FW_CFG_NB_CPUS   equ 0x05

KERNEL_START
    mov ax, FW_CFG_SIGNATURE
    call fw_cfg_select
    mov ecx, 4
    call fw_cfg_read
    cmp eax, "QEMU"
    je .signature_ok
    FAIL "no QEMU signature at fw_cfg item 0"
.signature_ok:
    PRINT "fw_cfg signature QEMU", 10

    mov ax, FW_CFG_RAM_SIZE             ; 64 bits, little-endian: low, then high half
    call fw_cfg_select
    mov ecx, 4
    call fw_cfg_read
    mov ebx, eax
    call fw_cfg_read
    test eax, eax
    jz .ram_below_4g
    FAIL "RAM size of 4 GiB or more"
.ram_below_4g:
    PRINT "fw_cfg RAM size "
    mov eax, ebx
    shr eax, 20
    call putdec
    PRINT " MiB", 10
    mov edx, [boot_ebx]                 ; mem_upper counts the KiB above 1 MiB
    mov eax, [edx + MBI_MEM_UPPER]
    add eax, 1024
    shl eax, 10
    cmp eax, ebx
    je .ram_agrees
    FAIL "fw_cfg RAM size disagrees with mem_upper"
.ram_agrees:
    mov ax, FW_CFG_NB_CPUS
    call fw_cfg_select
    mov ecx, 2
    call fw_cfg_read
    PRINT "fw_cfg CPUs "
    call putdec
    PRINT 10, "PASS", 10
    mov eax, EXIT_PASS
    jmp exit

%include "lib.inc"

section .bss
alignb 16
    resb 4096
stack_top:
