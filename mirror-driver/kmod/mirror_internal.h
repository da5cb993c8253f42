/* SPDX-License-Identifier: GPL-2.0 */
/* What the parts of specula_mirror.ko call across files. */
#ifndef SPECULA_MIRROR_INTERNAL_H
#define SPECULA_MIRROR_INTERNAL_H

#include <linux/compiler_types.h>

struct specula_mirror_vm_layout;

/* SPECULA_MIRROR_VM_LAYOUT (mirror_vm_layout.c). */
long specula_mirror_vm_layout(struct specula_mirror_vm_layout __user *uarg);

#endif
