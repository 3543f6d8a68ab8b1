; pc.asm - the PC as QEMU's -kernel leaves it, one check per run, chosen by the first
; argument after argv[0] as kvm-unit-tests' kernels take theirs (a loader that left out
; argv[0] would make the check's name argv[0], and the kernel fail for want of a check):
;
;   argv                          argv[0] and the arguments, printed
;   cr0                           CR0 at entry is 0x11 (PE, ET), as QEMU's option ROM leaves it
;   unassigned                    unclaimed memory reads 0, unclaimed ports all-ones (QEMU 7.2)
;   hpet                          the HPET's capabilities, its counter ticking, timer 0's
;                                 periodic interrupts on IRQ 0 (legacy route, the 8259)
;   reset92 | resetcf9            ask for a reset through port 0x92 or 0xcf9; never returns
;   reboot                        count boots in RAM at 0x1000: reset on the first, pass on the second
;   cpuid LEAF REG BIT WANT       CPUID.LEAF:REG[BIT] is WANT (hex numbers; REG a, b, c or d)
;   pctestdev                     pc-testdev's port register and its MMIO
;   emulation                     an x87 load from unassigned memory, which KVM cannot emulate

%include "defs.inc"
%define IDT_VECTORS 0x30

HPET        equ 0xFED00000
HPET_CFG    equ HPET + 0x10
HPET_COUNTER equ HPET + 0xF0
HPET_T0_CFG equ HPET + 0x100
HPET_T0_CMP equ HPET + 0x108
HPET_PERIOD_FS equ 10000000             ; QEMU's: 10 ns a tick
HPET_TICKS  equ 100000                  ; timer 0's period: 1 ms
HPET_IRQS   equ 3
UNASSIGNED_MMIO equ 0xE0000000          ; no RAM, no device: QEMU's PCI hole
UNASSIGNED_PORT equ 0x1234
TESTDEV_PORT equ 0xE0
TESTDEV_MEM equ 0xFF000000
BOOT_COUNT  equ 0x1000                  ; RAM the loader never writes: survives a reset


%macro CHECK 2+                         ; CHECK name, label: run `label` if the argument is `name`
    mov edi, %%name
    call word_is
    je %2
    jmp %%next
%%name: db %1, 0
%%next:
%endmacro

KERNEL_START
    mov eax, cr0
    mov [entry_cr0], eax
    call idt_init
    mov esi, [boot_ebx]
    mov esi, [esi + MBI_CMDLINE]
    PRINT "argv[0]='"
.name:
    lodsb
    test al, al
    jz .named
    cmp al, " "
    je .named
    call putc
    jmp .name
.named:
    PRINT "'", 10
    call cmdline_args
    CHECK "argv", check_argv
    CHECK "cr0", check_cr0
    CHECK "unassigned", check_unassigned
    CHECK "hpet", check_hpet
    CHECK "reset92", check_reset92
    CHECK "resetcf9", check_resetcf9
    CHECK "reboot", check_reboot
    CHECK "cpuid", check_cpuid
    CHECK "pctestdev", check_pctestdev
    CHECK "emulation", check_emulation
    FAIL "no such check (is argv[0] missing from the command line?)"

pass:
    PRINT "PASS", 10
    mov eax, EXIT_PASS
    jmp exit

check_argv:
    PRINT "args='"
    call puts
    PRINT "'", 10
    jmp pass

check_cr0:
    PRINT "CR0 at entry 0x"
    mov eax, [entry_cr0]
    call puthex
    PRINT 10
    cmp eax, 0x11
    je pass
    FAIL "CR0 is not 0x11 (PE, ET)"

check_unassigned:
    mov eax, -1
    mov eax, [UNASSIGNED_MMIO]
    PRINT "MMIO read of 0xe0000000: 0x"
    call puthex
    PRINT 10
    test eax, eax
    jz .mmio_ok
    FAIL "unassigned memory does not read 0"
.mmio_ok:
    xor eax, eax
    mov dx, UNASSIGNED_PORT
    in eax, dx
    PRINT "port 0x1234 read: 0x"
    call puthex
    PRINT 10
    cmp eax, -1
    je pass
    FAIL "an unassigned port does not read all-ones"

check_hpet:
    mov eax, [HPET]
    PRINT "HPET capabilities 0x"
    call puthex
    shr eax, 16
    cmp eax, 0x8086
    je .vendor_ok
    FAIL "HPET vendor is not 0x8086"
.vendor_ok:
    mov eax, [HPET + 4]
    PRINT ", period "
    call putdec
    PRINT " fs", 10
    cmp eax, HPET_PERIOD_FS
    je .period_ok
    FAIL "HPET period is not QEMU's 10 ns"
.period_ok:
    mov eax, [HPET_COUNTER]
    cmp eax, [HPET_COUNTER]
    je .halted_ok
    FAIL "the HPET counter runs before ENABLE_CNF"
.halted_ok:
    mov dword [HPET_CFG], 1             ; ENABLE_CNF
    mov ecx, 100000000
.spin:
    cmp dword [HPET_COUNTER], 1000      ; 10 us
    ja .ticks
    loop .spin
    FAIL "the HPET counter does not tick"
.ticks:
    PRINT "HPET counter ticks", 10
    call pic_init
    SET_GATE IRQ_BASE, hpet_interrupt
    ; timer 0: interrupts on, periodic, 32-bit (so one 4-byte write sets the comparator),
    ; VAL_SET: the next write sets comparator and period, the one after the period alone
    mov dword [HPET_T0_CFG], (1 << 2) | (1 << 3) | (1 << 6) | (1 << 8)
    mov eax, [HPET_COUNTER]
    add eax, HPET_TICKS
    mov [HPET_T0_CMP], eax
    mov dword [HPET_T0_CMP], HPET_TICKS
    mov dword [HPET_CFG], 3             ; ENABLE_CNF | LEG_RT_CNF: timer 0 on IRQ 0
.wait:
    sti
    hlt
    cli
    cmp dword [ticks], HPET_IRQS
    jb .wait
    mov dword [HPET_CFG], 0
    PRINT "HPET timer 0: interrupts on IRQ 0 through the 8259", 10
    jmp pass

hpet_interrupt:
    inc dword [ticks]
    push eax
    mov al, 0x20                        ; EOI
    out PIC1_CMD, al
    pop eax
    IRETURN

check_reset92:
    PRINT "reset through port 0x92", 10
    in al, 0x92
    or al, 1
    out 0x92, al
    FAIL "still running after the reset request"

check_resetcf9:
    PRINT "reset through port 0xcf9", 10
do_resetcf9:
    mov dx, 0xCF9
    mov al, 0x06                        ; SYS_RST | RST_CPU
    out dx, al
    FAIL "still running after the reset request"

check_reboot:
    inc dword [BOOT_COUNT]
    PRINT "boot "
    mov eax, [BOOT_COUNT]
    call putdec
    PRINT 10
    cmp eax, 2
    je pass
    jb do_resetcf9
    FAIL "booted more than twice"

check_cpuid:
    call parse_hex
    push eax                            ; LEAF
    movzx ebx, byte [esi]               ; REG: a, b, c or d
    sub ebx, "a"
    cmp ebx, 3
    jbe .reg_ok
    FAIL "cpuid: REG must be a, b, c or d"
.reg_ok:
    inc esi
    call skip_spaces
    call parse_hex
    mov ecx, eax                        ; BIT
    call parse_hex
    mov edi, eax                        ; WANT
    pop eax
    push ecx
    xor ecx, ecx
    push ebx
    cpuid
    mov [cpuid_regs], eax
    mov [cpuid_regs + 4], ebx
    mov [cpuid_regs + 8], ecx
    mov [cpuid_regs + 12], edx
    pop ebx
    pop ecx
    mov eax, [cpuid_regs + ebx * 4]
    PRINT "CPUID register 0x"
    call puthex
    shr eax, cl
    and eax, 1
    PRINT ", bit "
    xchg eax, ecx
    call putdec
    xchg eax, ecx
    PRINT " = "
    call putdec
    PRINT 10
    cmp eax, edi
    je pass
    FAIL "the CPUID bit is not what the CPU model says"

check_pctestdev:
    mov eax, 0x12345678
    out TESTDEV_PORT, eax
    in al, TESTDEV_PORT + 1
    cmp al, 0x56
    jne .bad_port
    in ax, TESTDEV_PORT + 2
    cmp ax, 0x1234
    jne .bad_port
    PRINT "pc-testdev port register reads back by bytes and words", 10
    mov dword [TESTDEV_MEM + 0x100], 0xDEADBEEF
    movzx eax, word [TESTDEV_MEM + 0x102]
    cmp eax, 0xDEAD
    jne .bad_mem
    PRINT "pc-testdev memory reads back", 10
    jmp pass
.bad_port:
    FAIL "pc-testdev's port register"
.bad_mem:
    FAIL "pc-testdev's memory"

check_emulation:
    PRINT "fld tword [0xe0000000]", 10
x87_load:
    fld tword [UNASSIGNED_MMIO]
    FAIL "the x87 load from unassigned memory ran"

; word_is: does the word at ESI (up to a space or NUL) equal the string at EDI? ZF set if
; so, and ESI then past it and its spaces; ESI unchanged if not.
word_is:
    push esi
.next:
    mov al, [edi]
    mov ah, [esi]
    test al, al
    jz .end
    cmp al, ah
    jne .no
    inc esi
    inc edi
    jmp .next
.end:
    test ah, ah
    jz .yes
    cmp ah, " "
    jne .no
.yes:
    call skip_spaces
    add esp, 4
    cmp eax, eax                        ; ZF
    ret
.no:
    pop esi
    or al, 1                            ; ZF clear: AL | 1 is never 0
    ret

skip_spaces:
    cmp byte [esi], " "
    jne .done
    inc esi
    jmp skip_spaces
.done:
    ret

; parse_hex: the hex number at ESI in EAX; ESI past it and its spaces.
parse_hex:
    push ebx
    xor eax, eax
.digit:
    movzx ebx, byte [esi]
    sub ebx, "0"
    cmp ebx, 9
    jbe .add
    sub ebx, "a" - "0" - 10
    cmp ebx, 10
    jb .done
    cmp ebx, 15
    ja .done
.add:
    shl eax, 4
    or eax, ebx
    inc esi
    jmp .digit
.done:
    call skip_spaces
    pop ebx
    ret

%include "lib.inc"

section .bss
entry_cr0: resd 1
cpuid_regs: resd 4
INTERRUPT_KERNEL_BSS
