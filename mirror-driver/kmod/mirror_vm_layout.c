// SPDX-License-Identifier: GPL-2.0
/*
 * specula_mirror - SPECULA_MIRROR_VM_LAYOUT: the memslots of a source's KVM VM,
 * read from the VM fd the caller took from the source (pidfd_getfd()).
 */

#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/magic.h>
#include <linux/mm.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/srcu.h>
#include <linux/uaccess.h>

#include "specula_access.h"
#include "specula_mirror.h"
#include "mirror_internal.h"

/* Most entries SPECULA_MIRROR_VM_LAYOUT writes per call. */
#define MIRROR_MAX_SLOTS	4096

#ifdef KVM_MAX_NR_ADDRESS_SPACES
#define MIRROR_KVM_AS_MAX		KVM_MAX_NR_ADDRESS_SPACES
#define mirror_kvm_nr_as(kvm)		kvm_arch_nr_memslot_as_ids(kvm)
#else
#define MIRROR_KVM_AS_MAX		KVM_ADDRESS_SPACE_NUM
#define mirror_kvm_nr_as(kvm)		KVM_ADDRESS_SPACE_NUM
#endif

/*
 * kvm_vm_fops is not exported, so a KVM VM file is recognised by what KVM
 * gives it: an anon inode file named "kvm-vm" (kvm_dev_ioctl_create_vm())
 * whose f_op belongs to KVM's vendor module (kvm_init() sets its owner to
 * kvm_intel or kvm_amd; NULL when KVM is built in, and in 6.4/6.5 where the
 * owner was briefly not set). Callers then require kvm->mm to be the
 * source's mm, which no other kind of file could satisfy by accident.
 */
static bool mirror_is_kvm_vm_file(struct file *file)
{
	const struct module *owner = file->f_op->owner;

	if (file_inode(file)->i_sb->s_magic != ANON_INODE_FS_MAGIC ||
	    strcmp(file_dentry(file)->d_name.name, "kvm-vm") ||
	    !file->private_data)
		return false;
	return !owner || !strncmp(owner->name, "kvm", 3);
}

static int mirror_slot_cmp(const void *a, const void *b)
{
	const struct specula_mirror_memslot *x = a, *y = b;

	if ((x->slot >> 16) != (y->slot >> 16))
		return (x->slot >> 16) < (y->slot >> 16) ? -1 : 1;
	if (x->guest_phys_addr != y->guest_phys_addr)
		return x->guest_phys_addr < y->guest_phys_addr ? -1 : 1;
	return 0;
}

/*
 * The VM's user memslots (ids below KVM_USER_MEM_SLOTS: KVM's private
 * slots are left out), sorted by address space and guest physical address,
 * in a kvmalloc()ed array; *count is their number.
 */
static int mirror_read_memslots(struct kvm *kvm,
				struct specula_mirror_memslot **out, u32 *count)
{
	struct kvm_memslots *slots[MIRROR_KVM_AS_MAX];
	struct specula_mirror_memslot *buf = NULL;
	struct kvm_memory_slot *memslot;
	int as, nr_as, bkt, idx, ret = 0;
	u32 n = 0, i = 0;

	idx = srcu_read_lock(&kvm->srcu);
	nr_as = mirror_kvm_nr_as(kvm);
	/* Each address space's memslots are read once: one snapshot. */
	for (as = 0; as < nr_as; as++) {
		slots[as] = __kvm_memslots(kvm, as);
		kvm_for_each_memslot(memslot, bkt, slots[as]) {
			if (memslot->id < KVM_USER_MEM_SLOTS)
				n++;
		}
	}
	if (n) {
		/* Sleeping inside an SRCU read section is allowed. */
		buf = kvmalloc_array(n, sizeof(*buf), GFP_KERNEL_ACCOUNT);
		if (!buf) {
			ret = -ENOMEM;
			goto out;
		}
	}
	for (as = 0; as < nr_as; as++) {
		kvm_for_each_memslot(memslot, bkt, slots[as]) {
			if (memslot->id >= KVM_USER_MEM_SLOTS || i >= n)
				continue;
			buf[i].guest_phys_addr = (u64)memslot->base_gfn << PAGE_SHIFT;
			buf[i].memory_size = (u64)memslot->npages << PAGE_SHIFT;
			buf[i].userspace_addr = memslot->userspace_addr;
			buf[i].slot = ((u32)as << 16) | (u16)memslot->id;
			buf[i].flags = memslot->flags;
			i++;
		}
	}
out:
	srcu_read_unlock(&kvm->srcu, idx);
	if (ret)
		return ret;
	sort(buf, i, sizeof(*buf), mirror_slot_cmp, NULL);
	*out = buf;
	*count = i;
	return 0;
}

long specula_mirror_vm_layout(struct specula_mirror_vm_layout __user *uarg)
{
	struct specula_mirror_memslot *slots = NULL;
	struct specula_mirror_vm_layout l;
	struct file *vm_file;
	struct mm_struct *mm;
	struct kvm *kvm;
	u32 count = 0;
	long ret;

	if (copy_from_user(&l, uarg, sizeof(l)))
		return -EFAULT;
	if (l.capacity > MIRROR_MAX_SLOTS)
		return -EINVAL;
	if (l.vm_fd < 0)
		return -EBADF;

	mm = specula_source_mm(l.pidfd);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	vm_file = fget(l.vm_fd);
	if (!vm_file) {
		ret = -EBADF;
		goto out_mmput;
	}
	ret = -EINVAL;
	if (!mirror_is_kvm_vm_file(vm_file))
		goto out_fput;
	/* The file's reference keeps the VM alive. */
	kvm = vm_file->private_data;
	if (kvm->mm != mm)
		goto out_fput;	/* a VM fd of another process */

	ret = mirror_read_memslots(kvm, &slots, &count);
	if (ret)
		goto out_fput;
	if (min(count, l.capacity) &&
	    copy_to_user(u64_to_user_ptr(l.slots_ptr), slots,
			 (size_t)min(count, l.capacity) * sizeof(*slots))) {
		ret = -EFAULT;
		goto out_free;
	}
	if (put_user(count, &uarg->count)) {
		ret = -EFAULT;
		goto out_free;
	}
	ret = count > l.capacity ? -ENOSPC : 0;
out_free:
	kvfree(slots);
out_fput:
	fput(vm_file);
out_mmput:
	mmput(mm);
	return ret;
}
