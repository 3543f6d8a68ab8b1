; stuck.asm - never writes isa-debug-exit, so the VMM must end the run itself. With the
; command line "halt" it says "halting" and sleeps in HLT with interrupts off (with the
; in-kernel irqchip KVM keeps the vCPU asleep; nothing exits to userspace); with "fault"
; it executes UD2 under the loader's empty IDT: #UD, #DF, then a triple fault
; (KVM_EXIT_SHUTDOWN).

%include "defs.inc"

KERNEL_START
    call cmdline_args
    cmp dword [esi], "faul"
    je .fault
    cmp dword [esi], "halt"
    je .halt
    mov eax, EXIT_FAIL                  ; neither: a test that forgot its command line
    jmp exit
.fault:
    ud2
.halt:
    PRINT "halting", 10
.sleep:
    cli
    hlt
    jmp .sleep

%include "lib.inc"

section .bss
alignb 16
    resb 4096
stack_top:
