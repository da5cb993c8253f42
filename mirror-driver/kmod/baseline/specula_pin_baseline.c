// SPDX-License-Identifier: GPL-2.0
/*
 * specula_pin_baseline - the pinning baseline that goes stale.
 *
 * The approach of memflow's kvm module, kept for tests and benchmarks to
 * compare the kernel mirror device against: SPECULA_MIRROR_ATTACH (same ABI
 * and access check as /dev/specula-mirror) takes a reference on every page
 * of the source range with get_user_pages_remote() at attach time, and
 * mmap() of the returned fd remap_pfn_range()s those pages read-only. There
 * is no notifier: once the source replaces a page (COW after fork, KSM,
 * MADV_DONTNEED, munmap, exit...) the view keeps showing the old one, which
 * the reference keeps allocated. Release drops the references.
 */

#include <linux/anon_inodes.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/module.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#include "../specula_access.h"
#include "../specula_mirror.h"

#define BASELINE_MAX_LENGTH	SZ_1G
#define BASELINE_GUP_CHUNK	512UL

static bool require_cap_sys_ptrace;
module_param(require_cap_sys_ptrace, bool, 0644);
MODULE_PARM_DESC(require_cap_sys_ptrace,
		 "Callers also need CAP_SYS_PTRACE (default: off)");

struct pin_baseline {
	struct mm_struct *mm;	/* mmgrab()ed, for source_alive only */
	unsigned long start;
	unsigned long npages;
	struct page **pages;	/* each holds a reference (FOLL_GET) */
};

static void baseline_free(struct pin_baseline *b, unsigned long pinned)
{
	unsigned long i;

	for (i = 0; i < pinned; i++) {
		put_page(b->pages[i]);
		if (!(i % 1024))
			cond_resched();
	}
	kvfree(b->pages);
	mmdrop(b->mm);
	kfree(b);
}

static int baseline_release(struct inode *inode, struct file *file)
{
	struct pin_baseline *b = file->private_data;

	baseline_free(b, b->npages);
	return 0;
}

static int baseline_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct pin_baseline *b = file->private_data;
	unsigned long pages = vma_pages(vma), i, run, pfn;
	int err;

	if (vma->vm_flags & (VM_WRITE | VM_EXEC))
		return -EACCES;
	if (vma->vm_pgoff >= b->npages || pages > b->npages - vma->vm_pgoff)
		return -EINVAL;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_mod(vma, VM_DONTCOPY, VM_MAYWRITE | VM_MAYEXEC);
#else
	vma->vm_flags = (vma->vm_flags | VM_DONTCOPY) &
			~(VM_MAYWRITE | VM_MAYEXEC);
#endif
	/* One remap_pfn_range() per run of physically contiguous pages. */
	for (i = 0; i < pages; i += run) {
		pfn = page_to_pfn(b->pages[vma->vm_pgoff + i]);
		run = 1;
		while (i + run < pages &&
		       page_to_pfn(b->pages[vma->vm_pgoff + i + run]) == pfn + run)
			run++;
		err = remap_pfn_range(vma, vma->vm_start + (i << PAGE_SHIFT),
				      pfn, run << PAGE_SHIFT,
				      vma->vm_page_prot);
		if (err)
			return err;	/* mmap_region() zaps what was mapped */
	}
	return 0;
}

static long baseline_file_ioctl(struct file *file, unsigned int cmd,
				unsigned long arg)
{
	struct pin_baseline *b = file->private_data;
	struct specula_mirror_info info;

	if (cmd != SPECULA_MIRROR_INFO)
		return -ENOTTY;
	memset(&info, 0, sizeof(info));
	info.start = b->start;
	info.length = (u64)b->npages << PAGE_SHIFT;
	info.faults = b->npages;	/* all pinned at attach */
	info.source_alive = atomic_read(&b->mm->mm_users) > 0;
	if (copy_to_user((void __user *)arg, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

static const struct file_operations baseline_file_fops = {
	.owner = THIS_MODULE,
	.mmap = baseline_mmap,
	.unlocked_ioctl = baseline_file_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.release = baseline_release,
};

/* References every page of the range, read-only; returns how many. */
static long baseline_pin(struct pin_baseline *b, struct mm_struct *mm)
{
	unsigned long pinned = 0;
	long got;

	if (mmap_read_lock_killable(mm))
		return 0;
	while (pinned < b->npages && !fatal_signal_pending(current)) {
		/* gup_flags 0: read-only; get_user_pages_remote() implies FOLL_GET. */
		got = get_user_pages_remote(mm, b->start + (pinned << PAGE_SHIFT),
					    min(b->npages - pinned,
						BASELINE_GUP_CHUNK),
					    0, b->pages + pinned,
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 5, 0)
					    NULL,
#endif
					    NULL);
		if (got <= 0)
			break;
		pinned += got;
	}
	mmap_read_unlock(mm);
	return pinned;
}

static long baseline_attach(struct specula_mirror_attach __user *uarg)
{
	struct specula_mirror_attach a;
	struct pin_baseline *b;
	unsigned long pinned;
	struct mm_struct *mm;
	struct file *file;
	long ret;
	int fd;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	mm = specula_attach_source(&a, BASELINE_MAX_LENGTH);
	if (IS_ERR(mm))
		return PTR_ERR(mm);

	ret = -ENOMEM;
	b = kzalloc(sizeof(*b), GFP_KERNEL_ACCOUNT);
	if (!b)
		goto out_mmput;
	mmgrab(mm);
	b->mm = mm;
	b->start = a.start;
	b->npages = a.length >> PAGE_SHIFT;
	b->pages = kvcalloc(b->npages, sizeof(*b->pages), GFP_KERNEL_ACCOUNT);
	if (!b->pages) {
		baseline_free(b, 0);
		goto out_mmput;
	}
	pinned = baseline_pin(b, mm);
	if (pinned < b->npages) {
		ret = fatal_signal_pending(current) ? -EINTR : -EFAULT;
		baseline_free(b, pinned);
		goto out_mmput;
	}

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		baseline_free(b, pinned);
		goto out_mmput;
	}
	file = anon_inode_getfile("[specula-pin-baseline]", &baseline_file_fops,
				  b, O_RDONLY);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		put_unused_fd(fd);
		baseline_free(b, pinned);
		goto out_mmput;
	}
	a.fd = fd;
	if (copy_to_user(&uarg->fd, &a.fd, sizeof(a.fd))) {
		put_unused_fd(fd);
		fput(file);	/* baseline_release() frees b */
		ret = -EFAULT;
		goto out_mmput;
	}
	fd_install(fd, file);
	ret = 0;
out_mmput:
	mmput(mm);
	return ret;
}

static long baseline_dev_ioctl(struct file *file, unsigned int cmd,
			       unsigned long arg)
{
	int err;

	if (cmd != SPECULA_MIRROR_ATTACH)
		return -ENOTTY;
	err = specula_check_cap(require_cap_sys_ptrace);
	if (err)
		return err;
	return baseline_attach((void __user *)arg);
}

static const struct file_operations baseline_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = baseline_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice baseline_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "specula-pin-baseline",
	.fops = &baseline_dev_fops,
	.mode = 0600,
};

module_misc_device(baseline_miscdev);

MODULE_DESCRIPTION("Specula pinning baseline: a read-only view of another process's memory that goes stale");
MODULE_LICENSE("GPL");
