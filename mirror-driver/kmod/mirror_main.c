// SPDX-License-Identifier: GPL-2.0
/*
 * specula_mirror - the kernel mirror device.
 *
 * /dev/specula-mirror lets a privileged importer map a read-only, zero-copy,
 * coherent view of a range of another process's memory (the source: a KVM
 * VMM's guest RAM). SPECULA_MIRROR_ATTACH returns a mapping fd; mmap() of it
 * gives a VM_PFNMAP | VM_IO VMA whose PTEs are filled on fault with the pfns
 * the source maps at that moment (hmm_range_fault(), no page reference kept)
 * and zapped, through the fd's own address_space, whenever an
 * mmu_interval_notifier on the source's range fires. Zapping goes through the
 * normal mm path, so the importer's own MMU notifiers (KVM's, when the
 * importer registers the mapping as a read-only memslot) drop what they
 * derived from the PTEs. SPECULA_MIRROR_VM_LAYOUT reads the memslots of the
 * source's KVM VM (mirror_vm_layout.c). See README.md for the design, locking
 * and threat model.
 */

#include <linux/anon_inodes.h>
#include <linux/atomic.h>
#include <linux/bitmap.h>
#include <linux/bitops.h>
#include <linux/build_bug.h>
#include <linux/compiler.h>
#include <linux/fs.h>
#include <linux/hmm.h>
#include <linux/kvm_host.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/mutex.h>
#include <linux/pseudo_fs.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/srcu.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#include "specula_access.h"
#include "specula_mirror.h"
#include "mirror_internal.h"

/* Largest range one mapping fd mirrors: its bitmap is length / 32 KiB bytes. */
#define MIRROR_MAX_LENGTH	SZ_1T
/* Collisions with invalidations one fault absorbs before backing off. */
#define MIRROR_FAULT_TRIES	16
/* The private pseudo file system that owns the mapping fds' inodes. */
#define MIRROR_FS_MAGIC		0x53504d52	/* "SPMR" */

static bool require_cap_sys_ptrace;
module_param(require_cap_sys_ptrace, bool, 0644);
MODULE_PARM_DESC(require_cap_sys_ptrace,
		 "Callers also need CAP_SYS_PTRACE (default: off)");

/*
 * One mapping fd.
 *
 * @notifier: the mmu_interval_notifier over [start, start + length) of @mm.
 * @mm: the source's mm, mmgrab()ed: its struct lives as long as we do, its
 *	address space does not (faults mmget_not_zero() it).
 * @inode: a private inode on mirror_mnt; the fd's f_mapping is its i_mapping,
 *	whose i_mmap tree holds exactly the importer VMAs of this fd, so
 *	unmap_mapping_range() on it zaps this mirror and nothing else.
 * @lock: serialises a fault's "check seq + insert PTE" with an
 *	invalidation's "zap + clear @mapped" (see mirror_invalidate()).
 * @mapped: one bit per page: set (under @lock, before the seq check) when a
 *	fault may insert a PTE for that page offset, cleared (under @lock)
 *	after the invalidation that zapped it. Read locklessly by invalidations.
 */
struct specula_mirror {
	struct mmu_interval_notifier notifier;
	struct mm_struct *mm;
	struct inode *inode;
	unsigned long start;
	unsigned long length;
	unsigned long npages;
	struct mutex lock;		/* see above */
	unsigned long *mapped;
	atomic64_t invalidations;
	atomic64_t faults;
};

static struct vfsmount *mirror_mnt;

/* Version shims. */

static void mirror_vm_flags_set(struct vm_area_struct *vma, vm_flags_t set,
				vm_flags_t clear)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_mod(vma, set, clear);
#else
	vma->vm_flags = (vma->vm_flags | set) & ~clear;
#endif
}

/* Drops the lock the fault was entered with (mmap_lock or the VMA lock). */
static void mirror_release_fault_lock(struct vm_fault *vmf)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
	release_fault_lock(vmf);
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	if (vmf->flags & FAULT_FLAG_VMA_LOCK)
		vma_end_read(vmf->vma);
	else
		mmap_read_unlock(vmf->vma->vm_mm);
#else
	mmap_read_unlock(vmf->vma->vm_mm);
#endif
}

/* Invalidation: runs in the source's context, possibly from reclaim. */

static bool mirror_invalidate(struct mmu_interval_notifier *mni,
			      const struct mmu_notifier_range *range,
			      unsigned long cur_seq)
{
	struct specula_mirror *m = container_of(mni, struct specula_mirror,
						notifier);
	unsigned long first, last;

	/* The interval tree only calls us when the ranges intersect. */
	first = (max(range->start, m->start) - m->start) >> PAGE_SHIFT;
	last = (min(range->end, m->start + m->length) - m->start +
		PAGE_SIZE - 1) >> PAGE_SHIFT;

	/*
	 * Publish the new sequence first, then look for pages that may be
	 * mapped. A fault sets its page's bit and then (after a full barrier)
	 * checks the sequence, both under m->lock: either it sees cur_seq and
	 * retries without inserting, or we see its bit and take m->lock below,
	 * which waits for its insert to finish before we zap it.
	 */
	mmu_interval_set_seq(mni, cur_seq);
	atomic64_inc(&m->invalidations);
	smp_mb(); /* seq store before bitmap load; pairs with mirror_fault() */
	if (find_next_bit(m->mapped, last, first) >= last)
		return true;

	/*
	 * Zapping takes i_mmap_rwsem and runs the importer's MMU notifiers:
	 * it sleeps. The OOM reaper calls us non-blockable; it skips this
	 * source VMA and the pages are freed later by exit_mmap(), which
	 * calls us blockable.
	 */
	if (!mmu_notifier_range_blockable(range))
		return false;

	mutex_lock(&m->lock);
	mmu_interval_set_seq(mni, cur_seq);
	unmap_mapping_range(m->inode->i_mapping, (loff_t)first << PAGE_SHIFT,
			    (loff_t)(last - first) << PAGE_SHIFT, 1);
	bitmap_clear(m->mapped, first, last - first);
	mutex_unlock(&m->lock);
	return true;
}

static const struct mmu_interval_notifier_ops mirror_mni_ops = {
	.invalidate = mirror_invalidate,
};

/* Fault: runs in the importer's context, with its fault lock held. */

static int mirror_pte_noop(pte_t *pte, unsigned long addr, void *data)
{
	return 0;
}

/*
 * Gives up this attempt: the fault is retried from the start without the
 * importer's lock held (if the caller allows), otherwise the access simply
 * faults again (no PTE was installed).
 */
static vm_fault_t mirror_fault_backoff(struct vm_fault *vmf)
{
	if (!(vmf->flags & FAULT_FLAG_ALLOW_RETRY))
		return VM_FAULT_NOPAGE;
	if (!(vmf->flags & FAULT_FLAG_RETRY_NOWAIT))
		mirror_release_fault_lock(vmf);
	return VM_FAULT_RETRY;
}

/*
 * Takes the source's mmap_lock for read. It is contended: waiting for it
 * with the importer's lock held could close a cycle (two processes that
 * mirror each other, each with a writer queued on its mmap_lock), so when
 * the fault can be retried drop the importer's lock, wait for the source's
 * lock to be free, and retry. Returns 0 with the source locked, or what the
 * fault handler returns.
 */
static vm_fault_t mirror_lock_source(struct vm_fault *vmf,
				     struct mm_struct *src)
{
	if (mmap_read_trylock(src))
		return 0;
	if (!(vmf->flags & FAULT_FLAG_ALLOW_RETRY))
		return mmap_read_lock_killable(src) ? VM_FAULT_SIGBUS : 0;
	if (vmf->flags & FAULT_FLAG_RETRY_NOWAIT)
		return VM_FAULT_RETRY;
	/* From here on vmf->vma and the mirror may be gone: only @src is ours. */
	mirror_release_fault_lock(vmf);
	if (!mmap_read_lock_killable(src))
		mmap_read_unlock(src);
	return VM_FAULT_RETRY;
}

static vm_fault_t mirror_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct specula_mirror *m = vma->vm_file->private_data;
	struct mm_struct *src = m->mm;
	unsigned long pgoff = vmf->pgoff;
	unsigned long hmm_pfn = 0;
	struct hmm_range range = {
		.notifier = &m->notifier,
		.hmm_pfns = &hmm_pfn,
		.default_flags = HMM_PFN_REQ_FAULT,	/* read-only */
	};
	unsigned int tries;
	bool was_mapped;
	vm_fault_t ret;
	int err;

	if ((vmf->flags & FAULT_FLAG_WRITE) || pgoff >= m->npages ||
	    vma->vm_mm == src ||
	    WARN_ON_ONCE(vma->vm_flags & (VM_WRITE | VM_MAYWRITE)))
		return VM_FAULT_SIGBUS;
	range.start = m->start + (pgoff << PAGE_SHIFT);
	range.end = range.start + PAGE_SIZE;

	/* The source's address space is gone (or going): nothing to map. */
	if (!mmget_not_zero(src))
		return VM_FAULT_SIGBUS;

	/*
	 * Allocate the importer's page tables for this address now, outside
	 * m->lock: vmf_insert_pfn() under m->lock must not allocate, since
	 * reclaim could invalidate a mirrored source page and the invalidation
	 * takes m->lock. The tables stay: nothing frees the page tables of a
	 * VMA while its fault lock is held.
	 */
	err = apply_to_page_range(vma->vm_mm, vmf->address, PAGE_SIZE,
				  mirror_pte_noop, NULL);
	if (err) {
		ret = vmf_error(err);
		goto out;
	}

	for (tries = 0; tries < MIRROR_FAULT_TRIES; tries++) {
		if (fatal_signal_pending(current))
			break;
		range.notifier_seq = mmu_interval_read_begin(&m->notifier);
		ret = mirror_lock_source(vmf, src);
		if (ret)
			goto out;
		err = hmm_range_fault(&range);
		mmap_read_unlock(src);
		if (err == -EBUSY) {
			cond_resched();
			continue;
		}
		if (err) {
			/* -EFAULT: a hole, unreadable or VM_IO/PFNMAP source memory. */
			ret = vmf_error(err);
			goto out;
		}

		mutex_lock(&m->lock);
		was_mapped = test_bit(pgoff, m->mapped);
		set_bit(pgoff, m->mapped);
		smp_mb__after_atomic();	/* pairs with smp_mb() in mirror_invalidate() */
		if (mmu_interval_read_retry(&m->notifier, range.notifier_seq)) {
			if (!was_mapped)
				clear_bit(pgoff, m->mapped);
			mutex_unlock(&m->lock);
			continue;
		}
		/* A special PTE with vma->vm_page_prot: read-only, no refcount. */
		ret = vmf_insert_pfn(vma, vmf->address,
				     page_to_pfn(hmm_pfn_to_page(hmm_pfn)));
		if (ret & VM_FAULT_ERROR) {
			if (!was_mapped)
				clear_bit(pgoff, m->mapped);
		} else {
			atomic64_inc(&m->faults);
		}
		mutex_unlock(&m->lock);
		goto out;
	}
	ret = mirror_fault_backoff(vmf);
out:
	/* Not mmput(): the last reference would run exit_mmap() in here. */
	mmput_async(src);
	return ret;
}

static const struct vm_operations_struct mirror_vm_ops = {
	.fault = mirror_fault,
	/* No .access: ptrace and /proc/PID/mem cannot reach the view. */
};

/* The mapping fd. */

static int mirror_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct specula_mirror *m = file->private_data;
	unsigned long pages = vma_pages(vma);

	if (vma->vm_flags & (VM_WRITE | VM_EXEC))
		return -EACCES;
	/* The fault path takes the source's mmap_lock under the importer's. */
	if (current->mm == m->mm)
		return -EINVAL;
	if (vma->vm_pgoff >= m->npages || pages > m->npages - vma->vm_pgoff)
		return -EINVAL;
	/*
	 * VM_IO | VM_PFNMAP: GUP (and so FOLL_FORCE, /proc/PID/mem,
	 * process_vm_readv, vmsplice) refuses the VMA; the PTEs are special.
	 * Without VM_MAYWRITE and VM_MAYEXEC mprotect() cannot add PROT_WRITE
	 * or PROT_EXEC, and a MAP_PRIVATE mapping is no COW mapping.
	 */
	mirror_vm_flags_set(vma, VM_PFNMAP | VM_IO | VM_DONTEXPAND |
			    VM_DONTDUMP | VM_DONTCOPY,
			    VM_MAYWRITE | VM_MAYEXEC);
	vma->vm_ops = &mirror_vm_ops;
	return 0;
}

static long mirror_file_ioctl(struct file *file, unsigned int cmd,
			      unsigned long arg)
{
	struct specula_mirror *m = file->private_data;
	struct specula_mirror_info info;

	if (cmd != SPECULA_MIRROR_INFO)
		return -ENOTTY;
	memset(&info, 0, sizeof(info));
	info.start = m->start;
	info.length = m->length;
	info.invalidations = atomic64_read(&m->invalidations);
	info.faults = atomic64_read(&m->faults);
	info.source_alive = atomic_read(&m->mm->mm_users) > 0;
	if (copy_to_user((void __user *)arg, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

/* Frees a mirror whose notifier is registered iff @registered. */
static void mirror_free(struct specula_mirror *m, bool registered)
{
	/* Waits for a running mirror_invalidate(); none is called after. */
	if (registered)
		mmu_interval_notifier_remove(&m->notifier);
	if (m->inode)
		iput(m->inode);
	if (m->mm)
		mmdrop(m->mm);
	kvfree(m->mapped);
	kfree(m);
}

/* Last close: every VMA of the fd is gone (each held a file reference). */
static int mirror_release(struct inode *inode, struct file *file)
{
	mirror_free(file->private_data, true);
	return 0;
}

static const struct file_operations mirror_file_fops = {
	.owner = THIS_MODULE,
	.mmap = mirror_mmap,
	.unlocked_ioctl = mirror_file_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.release = mirror_release,
};

/*
 * Every page of [start, end) of @mm lies in a VMA that hmm_range_fault() can
 * fault: no hole, no VM_IO / VM_PFNMAP / VM_MIXEDMAP VMA (which also rules
 * out mirroring a mirror). The layout may change later; faults on what is
 * then a hole or such a VMA get SIGBUS.
 */
static int mirror_check_vmas(struct mm_struct *mm, unsigned long start,
			     unsigned long end)
{
	struct vm_area_struct *vma;
	unsigned long addr = start;
	int err;

	err = mmap_read_lock_killable(mm);
	if (err)
		return err;
	while (addr < end) {
		vma = find_vma(mm, addr);
		if (!vma || vma->vm_start > addr ||
		    (vma->vm_flags & (VM_IO | VM_PFNMAP | VM_MIXEDMAP))) {
			err = -EFAULT;
			break;
		}
		addr = vma->vm_end;
	}
	mmap_read_unlock(mm);
	return err;
}

static long mirror_attach(struct specula_mirror_attach __user *uarg)
{
	struct specula_mirror_attach a;
	struct specula_mirror *m;
	struct mm_struct *mm;
	struct file *file;
	long ret;
	int fd;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	mm = specula_attach_source(&a, MIRROR_MAX_LENGTH);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	ret = mirror_check_vmas(mm, a.start, a.start + a.length);
	if (ret)
		goto out_mmput;

	ret = -ENOMEM;
	m = kzalloc(sizeof(*m), GFP_KERNEL_ACCOUNT);
	if (!m)
		goto out_mmput;
	m->start = a.start;
	m->length = a.length;
	m->npages = a.length >> PAGE_SHIFT;
	mutex_init(&m->lock);
	atomic64_set(&m->invalidations, 0);
	atomic64_set(&m->faults, 0);
	m->mapped = kvcalloc(BITS_TO_LONGS(m->npages), sizeof(unsigned long),
			     GFP_KERNEL_ACCOUNT);
	if (!m->mapped)
		goto out_free;
	m->inode = alloc_anon_inode(mirror_mnt->mnt_sb);
	if (IS_ERR(m->inode)) {
		ret = PTR_ERR(m->inode);
		m->inode = NULL;
		goto out_free;
	}
	mmgrab(mm);
	m->mm = mm;

	/* Needs mm_users > 0, which our mmget from specula_source_mm() holds. */
	ret = mmu_interval_notifier_insert(&m->notifier, mm, m->start,
					   m->length, &mirror_mni_ops);
	if (ret)
		goto out_free;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		goto out_free_registered;
	}
	file = anon_inode_getfile("[specula-mirror]", &mirror_file_fops, m,
				  O_RDONLY);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		put_unused_fd(fd);
		goto out_free_registered;
	}
	/* Our own address_space: zaps reach this fd's VMAs only. */
	file->f_mapping = m->inode->i_mapping;

	a.fd = fd;
	if (copy_to_user(&uarg->fd, &a.fd, sizeof(a.fd))) {
		put_unused_fd(fd);
		fput(file);	/* mirror_release() frees m */
		ret = -EFAULT;
		goto out_mmput;
	}
	fd_install(fd, file);
	mmput(mm);
	return 0;

out_free_registered:
	mirror_free(m, true);
	goto out_mmput;
out_free:
	mirror_free(m, false);
out_mmput:
	mmput(mm);
	return ret;
}

/* /dev/specula-mirror */

static long mirror_dev_ioctl(struct file *file, unsigned int cmd,
			     unsigned long arg)
{
	void __user *uarg = (void __user *)arg;
	int err;

	if (cmd != SPECULA_MIRROR_ATTACH && cmd != SPECULA_MIRROR_VM_LAYOUT)
		return -ENOTTY;
	err = specula_check_cap(require_cap_sys_ptrace);
	if (err)
		return err;
	if (cmd == SPECULA_MIRROR_ATTACH)
		return mirror_attach(uarg);
	return specula_mirror_vm_layout(uarg);
}

static const struct file_operations mirror_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = mirror_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice mirror_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "specula-mirror",
	.fops = &mirror_dev_fops,
	.mode = 0600,
};

static int mirror_fs_init_fs_context(struct fs_context *fc)
{
	return init_pseudo(fc, MIRROR_FS_MAGIC) ? 0 : -ENOMEM;
}

/*
 * No .owner: the superblock must not pin the module (it lives from init to
 * exit). Every inode on it is put in mirror_release(), which runs while the
 * file still holds its module reference.
 */
static struct file_system_type mirror_fs_type = {
	.name = "specula_mirror",
	.init_fs_context = mirror_fs_init_fs_context,
	.kill_sb = kill_anon_super,
};

static int __init mirror_init(void)
{
	int err;

	BUILD_BUG_ON(sizeof(struct specula_mirror_attach) != 32);
	BUILD_BUG_ON(sizeof(struct specula_mirror_memslot) != 32);
	BUILD_BUG_ON(sizeof(struct specula_mirror_vm_layout) != 24);
	BUILD_BUG_ON(sizeof(struct specula_mirror_info) != 40);

	mirror_mnt = kern_mount(&mirror_fs_type);
	if (IS_ERR(mirror_mnt))
		return PTR_ERR(mirror_mnt);
	err = misc_register(&mirror_miscdev);
	if (err) {
		kern_unmount(mirror_mnt);
		return err;
	}
	return 0;
}

static void __exit mirror_exit(void)
{
	misc_deregister(&mirror_miscdev);
	kern_unmount(mirror_mnt);
}

module_init(mirror_init);
module_exit(mirror_exit);

MODULE_DESCRIPTION("Specula kernel mirror device: coherent read-only view of another process's memory");
MODULE_LICENSE("GPL");
