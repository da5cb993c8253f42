/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The access check shared by specula_mirror.ko and
 * specula_pin_baseline.ko: pidfd -> task -> mm, allowed only where the caller
 * could ptrace the task with PTRACE_MODE_ATTACH_REALCREDS.
 *
 * None of pidfd_get_task(), pidfd_pid(), mm_access(), ptrace_may_access() or
 * security_ptrace_access_check() is exported to modules (checked against the
 * Module.symvers of Debian's 6.1 cloud kernel; 6.12 exports none of them
 * either), so this file rebuilds them from what is exported:
 *
 *  - pidfd: fget() the fd and recognise a pidfd by its file system: an anon
 *    inode file named "[pidfd]" whose private_data is the struct pid (up to
 *    6.8), or a file of pidfs whose inode's i_private is the struct pid (6.9
 *    and later). Only kernel/fork.c and fs/pidfs.c create such files.
 *  - mm_access(task, PTRACE_MODE_ATTACH_REALCREDS): taken step by step, under
 *    the task's exec_update_lock as mm_access() does, so the mm we return is
 *    the one the credentials were checked against (an exec cannot slip in
 *    between). The credential and dumpability rules are those of
 *    __ptrace_may_access(); what cannot be reproduced is its last step,
 *    security_ptrace_access_check(): LSM policies (Yama's ptrace_scope,
 *    SELinux, AppArmor) are NOT consulted. The device node is 0600 and the
 *    require_cap_sys_ptrace module parameter additionally demands
 *    CAP_SYS_PTRACE (which also satisfies Yama scopes 1 and 2); Yama scope 3
 *    and LSM ptrace denials are not honoured.
 */
#ifndef SPECULA_ACCESS_H
#define SPECULA_ACCESS_H

#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <linux/mm.h>
#include <linux/pid.h>
#include <linux/rcupdate.h>
#include <linux/rwsem.h>
#include <linux/sched.h>
#include <linux/sched/coredump.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/string.h>
#include <linux/uidgid.h>
#include <linux/version.h>

#include "specula_mirror.h"

/* The struct pid a pidfd refers to, borrowed from @file. */
static inline struct pid *specula_pidfd_pid(struct file *file)
{
	struct inode *inode = file_inode(file);

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	if (inode->i_sb->s_magic != PID_FS_MAGIC || !inode->i_private)
		return ERR_PTR(-EBADF);
	return inode->i_private;
#else
	if (inode->i_sb->s_magic != ANON_INODE_FS_MAGIC ||
	    strcmp(file_dentry(file)->d_name.name, "[pidfd]") ||
	    !file->private_data)
		return ERR_PTR(-EBADF);
	return file->private_data;
#endif
}

/* The task a pidfd refers to, with a reference, or an ERR_PTR. */
static inline struct task_struct *specula_pidfd_task(unsigned int pidfd)
{
	struct task_struct *task;
	struct file *file;
	struct pid *pid;

	file = fget(pidfd);
	if (!file)
		return ERR_PTR(-EBADF);
	pid = specula_pidfd_pid(file);
	if (IS_ERR(pid)) {
		task = ERR_CAST(pid);
	} else {
		task = get_pid_task(pid, PIDTYPE_PID);
		if (!task)
			task = ERR_PTR(-ESRCH);
	}
	fput(file);
	return task;
}

/*
 * __ptrace_may_access(task, PTRACE_MODE_ATTACH_REALCREDS) without the LSM
 * hook; @mm is the task's mm, read under its exec_update_lock.
 */
static inline bool specula_may_ptrace(struct task_struct *task,
				      struct mm_struct *mm)
{
	const struct cred *cred = current_cred(), *tcred;
	bool ok;

	if (same_thread_group(task, current))
		return true;
	rcu_read_lock();
	tcred = __task_cred(task);
	ok = (uid_eq(cred->uid, tcred->euid) &&
	      uid_eq(cred->uid, tcred->suid) &&
	      uid_eq(cred->uid, tcred->uid) &&
	      gid_eq(cred->gid, tcred->egid) &&
	      gid_eq(cred->gid, tcred->sgid) &&
	      gid_eq(cred->gid, tcred->gid)) ||
	     ns_capable(tcred->user_ns, CAP_SYS_PTRACE);
	rcu_read_unlock();
	if (!ok)
		return false;
	/* Dumpability after the credentials; pairs with commit_creds(). */
	smp_rmb();
	return get_dumpable(mm) == SUID_DUMP_USER ||
	       ns_capable(mm->user_ns, CAP_SYS_PTRACE);
}

/*
 * The mm of the process @pidfd refers to, with an mm_users reference
 * (mmput() it), if the caller may ptrace it; else an ERR_PTR: -EBADF (not a
 * pidfd), -ESRCH (no such process, or no mm: a kernel thread or a zombie),
 * -EPERM (access denied), -EINTR (fatal signal while waiting).
 */
static inline struct mm_struct *specula_source_mm(unsigned int pidfd)
{
	struct task_struct *task;
	struct mm_struct *mm;
	int err;

	task = specula_pidfd_task(pidfd);
	if (IS_ERR(task))
		return ERR_CAST(task);
	err = down_read_killable(&task->signal->exec_update_lock);
	if (err) {
		put_task_struct(task);
		return ERR_PTR(err);
	}
	mm = get_task_mm(task);
	if (!mm) {
		mm = ERR_PTR(-ESRCH);
	} else if (mm != current->mm && !specula_may_ptrace(task, mm)) {
		mmput(mm);
		mm = ERR_PTR(-EPERM);
	}
	up_read(&task->signal->exec_update_lock);
	put_task_struct(task);
	return mm;
}

/* The require_cap_sys_ptrace module parameter's check. */
static inline int specula_check_cap(bool require_cap_sys_ptrace)
{
	if (require_cap_sys_ptrace && !capable(CAP_SYS_PTRACE))
		return -EPERM;
	return 0;
}

/*
 * The checks both modules make on struct specula_mirror_attach's range:
 * flags and reserved zero, page aligned, non-empty, no overflow, below the
 * largest user address (TASK_SIZE_MAX; the source's own mm->task_size is
 * checked once the mm is known), and at most @max_length bytes.
 */
static inline int specula_check_range(u32 flags, u32 reserved, u64 start,
				      u64 length, u64 max_length)
{
	if (flags || reserved)
		return -EINVAL;
	if (!length || !PAGE_ALIGNED(start) || !PAGE_ALIGNED(length))
		return -EINVAL;
	if (length > max_length || start > TASK_SIZE_MAX ||
	    length > TASK_SIZE_MAX - start)
		return -EINVAL;
	return 0;
}

/*
 * Both modules' start of SPECULA_MIRROR_ATTACH: the range checks, the source's
 * mm (with an mm_users reference: mmput() it) if the caller may ptrace it, and
 * the range within that mm. Never the caller's own mm: the fault path takes
 * the source's mmap_lock under the importer's.
 */
static inline struct mm_struct *
specula_attach_source(const struct specula_mirror_attach *a, u64 max_length)
{
	struct mm_struct *mm;
	int err;

	err = specula_check_range(a->flags, a->reserved, a->start, a->length,
				  max_length);
	if (err)
		return ERR_PTR(err);
	mm = specula_source_mm(a->pidfd);
	if (IS_ERR(mm))
		return mm;
	if (mm == current->mm || a->start + a->length > mm->task_size) {
		mmput(mm);
		return ERR_PTR(-EINVAL);
	}
	return mm;
}

#endif /* SPECULA_ACCESS_H */
