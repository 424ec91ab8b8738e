/*
 * Entry point of the kvmerge payload guest (see PROTOCOL.md).
 *
 * Every vCPU starts here at the same time, in 64-bit ring 3, with
 * RDI = vCPU index, RSI = guest-physical address of boot_params and RSP = 0.
 * Each vCPU gets its own stack from .bss and calls
 *     payload_main(uint64_t cpu, uint64_t boot_params_gpa)
 * which never returns. RDI and RSI already hold those two arguments.
 */

#define PAYLOAD_MAX_CPUS   64
#define PAYLOAD_STACK_SHIFT 14      /* 16 KiB per vCPU: indexed with a shift */
#define PAYLOAD_STACK_SIZE (1 << PAYLOAD_STACK_SHIFT)
#define IDLE_PORT          0xf5

/*
 * The kvmerge note: it tells the VMM to start this ELF as a payload (ring 3)
 * instead of as a Linux kernel. Layout: namesz, descsz, type, then the name
 * and the descriptor, each padded to 4 bytes.
 */
	.section .note.kvmerge, "a", @note
	.balign 4
	.long 2f - 1f			/* namesz: "kvmerge" + NUL = 8 */
	.long 4f - 3f			/* descsz: 4 */
	.long 0x4b4d0001		/* type: payload protocol version note */
1:	.asciz "kvmerge"
2:	.balign 4
3:	.long 1				/* protocol version */
4:	.balign 4

	.section .text.entry, "ax", @progbits
	.globl _start
	.type _start, @function
_start:
	cmpq $PAYLOAD_MAX_CPUS, %rdi
	jae .Lno_stack

	/* RSP = top of this vCPU's stack; 16-byte aligned before the call, as the ABI wants. */
	leaq 1(%rdi), %rax
	shlq $PAYLOAD_STACK_SHIFT, %rax
	leaq payload_stacks(%rip), %rsp
	addq %rax, %rsp
	xorl %ebp, %ebp			/* terminate frame-pointer chains */
	call payload_main

	/* payload_main does not return; idle if it ever does. */
.Lidle:
	inb $IDLE_PORT, %al
	jmp .Lidle

	/*
	 * A vCPU beyond the stack array is still a valid application processor:
	 * it needs no stack to check in (the same counter payload.c increments)
	 * and idle, so the BSP's count stays right with any number of vCPUs.
	 */
.Lno_stack:
	lock incq payload_ap_checkins(%rip)
	jmp .Lidle
	.size _start, . - _start

	.section .bss
	.balign 4096
	.type payload_stacks, @object
payload_stacks:
	.skip PAYLOAD_MAX_CPUS * PAYLOAD_STACK_SIZE
	.size payload_stacks, . - payload_stacks

	.section .note.GNU-stack, "", @progbits
