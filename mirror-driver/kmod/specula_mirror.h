/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The user ABI of /dev/specula-mirror (specula_mirror.ko) and
 * /dev/specula-pin-baseline (specula_pin_baseline.ko).
 *
 * All structures have the same layout on 32- and 64-bit user space (no
 * pointers, no implicit padding), so the ioctls need no compat translation.
 */
#ifndef _UAPI_SPECULA_MIRROR_H
#define _UAPI_SPECULA_MIRROR_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define SPECULA_MIRROR_IOC_MAGIC 0xB7

struct specula_mirror_attach {
	__u32 pidfd;     /* in: pidfd of the source process */
	__u32 flags;     /* in: must be 0 */
	__u64 start;     /* in: source virtual address, page aligned */
	__u64 length;    /* in: bytes, page aligned, > 0, start+length must not overflow and must be <= TASK_SIZE */
	__s32 fd;        /* out: the mapping fd (O_RDONLY | O_CLOEXEC) */
	__u32 reserved;  /* in: must be 0 */
};
#define SPECULA_MIRROR_ATTACH _IOWR(SPECULA_MIRROR_IOC_MAGIC, 1, struct specula_mirror_attach)

struct specula_mirror_memslot {
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;   /* in the source's address space */
	__u32 slot;             /* (address space id << 16) | slot id, as KVM_SET_USER_MEMORY_REGION */
	__u32 flags;            /* KVM_MEM_* flags of the slot */
};

struct specula_mirror_vm_layout {
	__u32 pidfd;     /* in: pidfd of the source process */
	__s32 vm_fd;     /* in: an fd in the CALLER's table for the source's KVM VM (the caller gets it with pidfd_getfd) */
	__u32 capacity;  /* in: entries at slots_ptr */
	__u32 count;     /* out: number of memslots the VM has; if > capacity, only capacity entries were written and the call returns -ENOSPC */
	__u64 slots_ptr; /* in: user pointer to capacity struct specula_mirror_memslot */
};
#define SPECULA_MIRROR_VM_LAYOUT _IOWR(SPECULA_MIRROR_IOC_MAGIC, 2, struct specula_mirror_vm_layout)

/* on a mapping fd */
struct specula_mirror_info {
	__u64 start;          /* source address of offset 0 */
	__u64 length;
	__u64 invalidations;  /* notifier invalidations that hit this range so far */
	__u64 faults;         /* pages inserted so far */
	__u32 source_alive;   /* 0 once the source's address space is gone */
	__u32 reserved;
};
#define SPECULA_MIRROR_INFO _IOR(SPECULA_MIRROR_IOC_MAGIC, 3, struct specula_mirror_info)

#endif /* _UAPI_SPECULA_MIRROR_H */
