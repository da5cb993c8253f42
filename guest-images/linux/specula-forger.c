/*
 * specula-forger: a guest user process that forges a Linux kernel in its own
 * pages, the way an attacker would mislead an introspection tool that finds the
 * kernel from RAM alone, and hides itself in the forgery.
 *
 * It copies the kernel's top-level page table (swapper_pg_dir) into its pages,
 * maps swapper_pg_dir's own address onto its copy, and writes a copy of the
 * kernel's VMCOREINFO whose phys_base puts the page-table root in its copy.
 * Through the copy every kernel address reads what it reads through the
 * kernel's tables (kallsyms, BTF, the task list), except where the forger
 * redirected it: the two pages of the task list that link to its own task
 * (its neighbours' `tasks` entries) map onto copies that link past it, so the
 * forged kernel's task list leaves the forger out. Each redirected address gets
 * its own copies of the tables on its path (large pages split), so the kernel's
 * tables are never touched. The copy passes every test a discovery from RAM
 * alone can apply: it is a second, valid, self-consistent kernel, in which the
 * forger does not exist. Only the vCPUs' CR3s say which one runs.
 *
 * It needs the physical addresses of its pages (/proc/self/pagemap shows PFNs
 * to CAP_SYS_ADMIN only), kernel memory (/proc/kcore, CAP_SYS_RAWIO) and
 * kernel addresses (/proc/kallsyms shows them to CAP_SYSLOG only), so the test
 * runs it as root; an unprivileged process can learn none of them. It writes
 * nothing but its own memory. It prints "forger pid=PID vmcoreinfo_pa=PA
 * hidden=1" and waits to be killed.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define START_KERNEL_MAP 0xffffffff80000000UL
#define ADDR_MASK 0x000ffffffffff000UL
#define PS (1UL << 7)

static int kcore = -1;
static Elf64_Phdr *segments;
static int nsegments;

static void die(const char *what)
{
	fprintf(stderr, "specula-forger: %s\n", what);
	exit(1);
}

/* Opens /proc/kcore and reads its program headers. */
static void kcore_open(void)
{
	Elf64_Ehdr eh;

	kcore = open("/proc/kcore", O_RDONLY);
	if (kcore < 0 || pread(kcore, &eh, sizeof(eh), 0) != sizeof(eh))
		die("cannot read /proc/kcore");
	nsegments = eh.e_phnum;
	segments = calloc(nsegments, sizeof(*segments));
	if (!segments || pread(kcore, segments, nsegments * sizeof(*segments), (off_t)eh.e_phoff) !=
			     (ssize_t)(nsegments * sizeof(*segments)))
		die("cannot read /proc/kcore's program headers");
}

/* len bytes of kernel virtual memory at va. */
static void kread(uint64_t va, void *buf, size_t len)
{
	for (int i = 0; i < nsegments; i++) {
		Elf64_Phdr *p = &segments[i];

		if (p->p_type == PT_LOAD && va >= p->p_vaddr && va + len <= p->p_vaddr + p->p_memsz) {
			if (pread(kcore, buf, len, (off_t)(p->p_offset + va - p->p_vaddr)) != (ssize_t)len)
				die("a read of /proc/kcore failed");
			return;
		}
	}
	fprintf(stderr, "specula-forger: %#" PRIx64 " is in no /proc/kcore segment\n", va);
	exit(1);
}

/* The physical address of the page holding p (present: it was written). */
static uint64_t phys_of(const void *p)
{
	uint64_t entry;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0 || pread(fd, &entry, 8, (off_t)((uintptr_t)p / PAGE * 8)) != 8)
		die("cannot read /proc/self/pagemap");
	close(fd);
	if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1)))
		die("no page frame in /proc/self/pagemap (needs CAP_SYS_ADMIN)");
	return (entry & ((1ULL << 55) - 1)) * PAGE;
}

/* A kernel symbol's address from /proc/kallsyms (real addresses as root); 0 if absent. */
static uint64_t ksym(const char *name)
{
	char line[512], sym[256], kind;
	uint64_t addr;
	FILE *f = fopen("/proc/kallsyms", "r");

	if (!f)
		die("cannot open /proc/kallsyms");
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%" SCNx64 " %c %255s", &addr, &kind, sym) == 3 && !strcmp(sym, name)) {
			fclose(f);
			return addr;
		}
	}
	fclose(f);
	return 0;
}

/* The forger's pages: forged tables and data copies, locked, with their addresses. */
#define POOL 48
static uint8_t *pool;
static uint64_t pool_pa[POOL];
static int pool_used;
static uint64_t direct_map;

static int pool_alloc(void)
{
	if (pool_used == POOL)
		die("out of forger pages");
	return pool_used++;
}

static uint64_t *pool_page(int n)
{
	return (uint64_t *)(pool + n * PAGE);
}

/* The pool page at physical address pa, or -1: a table already the forger's. */
static int pool_index_of(uint64_t pa)
{
	for (int i = 0; i < pool_used; i++)
		if (pool_pa[i] == pa)
			return i;
	return -1;
}

/*
 * Maps va onto the page at target_pa in the forged tables rooted at pool page 0:
 * every table on va's path becomes the forger's own copy (a large page split
 * into a table of smaller ones), and va's last entry points at target_pa.
 */
static void remap(uint64_t va, uint64_t target_pa)
{
	uint64_t *table = pool_page(0), entry;
	int level, i;

	for (level = 0; level < 3; level++) {
		int index = (va >> (39 - 9 * level)) & 511;
		int n;

		entry = table[index];
		if (!(entry & 1))
			die("an address to redirect is not mapped");
		n = pool_index_of(entry & ADDR_MASK);
		if (n < 0 && level > 0 && (entry & PS)) {
			/* A large page: split it into a table of the next size down. */
			uint64_t size = 1UL << (39 - 9 * level), child = size >> 9;
			uint64_t base = entry & ADDR_MASK & ~(size - 1);
			uint64_t flags = (entry & 0xfffUL & ~(1UL << 12)) | (entry & (1UL << 63));

			n = pool_alloc();
			for (i = 0; i < 512; i++)
				pool_page(n)[i] = (base + i * child) | (level == 2 ? flags & ~PS : flags);
		} else if (n < 0) {
			n = pool_alloc();
			kread(direct_map + (entry & ADDR_MASK), pool_page(n), PAGE);
		}
		table[index] = pool_pa[n] | (entry & 0xfffUL & ~PS) | (entry & (1UL << 63));
		table = pool_page(n);
	}
	entry = table[(va >> 12) & 511];
	table[(va >> 12) & 511] = target_pa | (entry & 0xfffUL) | (entry & (1UL << 63)) | 1;
}

/* The forger's copy of the kernel page at page_va (read once, then kept). */
static uint8_t *data_copy(uint64_t page_va)
{
	static uint64_t copied_va[8];
	static int copied_n[8], copies;
	int n;

	for (int i = 0; i < copies; i++)
		if (copied_va[i] == page_va)
			return (uint8_t *)pool_page(copied_n[i]);
	if (copies == 8)
		die("too many pages to redirect");
	n = pool_alloc();
	kread(page_va, pool_page(n), PAGE);
	remap(page_va, pool_pa[n]);
	copied_va[copies] = page_va;
	copied_n[copies++] = n;
	return (uint8_t *)pool_page(n);
}

/* Writes value at the kernel address va, in the forged view only. */
static void forge_u64(uint64_t va, uint64_t value)
{
	if ((va & (PAGE - 1)) > PAGE - 8)
		die("a list pointer crosses a page");
	memcpy(data_copy(va & ~(PAGE - 1)) + (va & (PAGE - 1)), &value, 8);
}

/* The kernel's BTF (/sys/kernel/btf/vmlinux, readable by anyone). */
static uint8_t *btf_types, *btf_end;
static const char *btf_strings;
static uint32_t btf_strings_len;
static uint32_t *btf_type_at;
static uint32_t btf_count;

#define BTF_KIND_STRUCT 4
#define BTF_KIND_UNION 5

/* The bytes that follow a type's 12-byte header. */
static uint32_t btf_extra(uint32_t kind, uint32_t vlen)
{
	switch (kind) {
	case 1: case 14: case 17: return 4;		/* INT, VAR, DECL_TAG */
	case 3: return 12;				/* ARRAY */
	case 4: case 5: case 15: case 19: return vlen * 12; /* STRUCT, UNION, DATASEC, ENUM64 */
	case 6: case 13: return vlen * 8;		/* ENUM, FUNC_PROTO */
	default: return 0;
	}
}

static void btf_load(void)
{
	size_t size = 0, cap = 1 << 20;
	uint8_t *data = malloc(cap);
	uint32_t *hdr, hdr_len, type_off, type_len, str_off, str_len, off = 0;
	ssize_t got;
	int fd = open("/sys/kernel/btf/vmlinux", O_RDONLY);

	if (fd < 0 || !data)
		die("cannot read /sys/kernel/btf/vmlinux");
	while ((got = read(fd, data + size, cap - size)) > 0) {
		size += got;
		if (size == cap && !(data = realloc(data, cap *= 2)))
			die("out of memory");
	}
	close(fd);
	hdr = (uint32_t *)data;
	if (size < 24 || (hdr[0] & 0xffff) != 0xeb9f)
		die("/sys/kernel/btf/vmlinux is not BTF");
	hdr_len = hdr[1], type_off = hdr[2], type_len = hdr[3], str_off = hdr[4], str_len = hdr[5];
	if ((uint64_t)hdr_len + type_off + type_len > size || (uint64_t)hdr_len + str_off + str_len > size)
		die("the BTF's sections are outside it");
	btf_types = data + hdr_len + type_off;
	btf_end = btf_types + type_len;
	btf_strings = (const char *)data + hdr_len + str_off;
	btf_strings_len = str_len;
	btf_type_at = calloc(type_len / 12 + 2, sizeof(*btf_type_at));
	if (!btf_type_at)
		die("out of memory");
	btf_count = 1; /* type 0 is void */
	while (off + 12 <= type_len) {
		uint32_t info = ((uint32_t *)(btf_types + off))[1];

		btf_type_at[btf_count++] = off;
		off += 12 + btf_extra((info >> 24) & 0x1f, info & 0xffff);
	}
}

static const char *btf_name(uint32_t off)
{
	return off < btf_strings_len ? btf_strings + off : "";
}

/* Type id past typedefs and qualifiers. */
static uint32_t btf_resolve(uint32_t id)
{
	for (int hops = 0; id && id < btf_count && hops < 16; hops++) {
		uint32_t *t = (uint32_t *)(btf_types + btf_type_at[id]);
		uint32_t kind = (t[1] >> 24) & 0x1f;

		if (kind != 8 && kind != 9 && kind != 10 && kind != 11 && kind != 18)
			return id;
		id = t[2];
	}
	return id;
}

/* Byte offset of member `name` in struct or union `id`, inside anonymous members too; -1 if none. */
static long btf_member(uint32_t id, const char *name, int depth)
{
	uint32_t *t, info, kind, vlen;

	if (!id || id >= btf_count || depth > 4)
		return -1;
	t = (uint32_t *)(btf_types + btf_type_at[id]);
	info = t[1], kind = (info >> 24) & 0x1f, vlen = info & 0xffff;
	if ((kind != BTF_KIND_STRUCT && kind != BTF_KIND_UNION) || (uint8_t *)(t + 3 + 3 * vlen) > btf_end)
		return -1;
	for (uint32_t i = 0; i < vlen; i++) {
		uint32_t *m = t + 3 + 3 * i;
		uint32_t bits = (info >> 31) ? m[2] & 0xffffff : m[2];
		long inner;

		if (m[0] && !strcmp(btf_name(m[0]), name))
			return bits / 8;
		if (!m[0] && (inner = btf_member(btf_resolve(m[1]), name, depth + 1)) >= 0)
			return bits / 8 + inner;
	}
	return -1;
}

/* The id of the struct named `name` (with members: not a forward declaration). */
static uint32_t btf_struct(const char *name)
{
	for (uint32_t id = 1; id < btf_count; id++) {
		uint32_t *t = (uint32_t *)(btf_types + btf_type_at[id]);

		if (((t[1] >> 24) & 0x1f) == BTF_KIND_STRUCT && (t[1] & 0xffff) && !strcmp(btf_name(t[0]), name))
			return id;
	}
	die("no struct in the kernel's BTF by that name");
	return 0;
}

/*
 * Leaves this process out of the forged kernel's task list: its neighbours'
 * `tasks` links, in copies of their pages, point past it. Returns its task.
 */
static uint64_t hide_self(void)
{
	uint32_t task_struct;
	long tasks_off, pid_off;
	uint64_t head, at, next, prev;
	int32_t pid;
	int steps;

	btf_load();
	task_struct = btf_struct("task_struct");
	tasks_off = btf_member(task_struct, "tasks", 0);
	pid_off = btf_member(task_struct, "pid", 0);
	if (tasks_off < 0 || pid_off < 0)
		die("no tasks or pid in the BTF's task_struct");
	head = ksym("init_task");
	if (!head)
		die("no init_task in /proc/kallsyms");
	head += tasks_off;
	kread(head, &at, 8);
	for (steps = 0; at != head; steps++) {
		if (steps > 100000)
			die("the task list does not come back to init_task");
		kread(at - tasks_off + pid_off, &pid, 4);
		if (pid == getpid())
			break;
		kread(at, &at, 8);
	}
	if (at == head)
		die("this process is not in the task list");
	kread(at, &next, 8);
	kread(at + 8, &prev, 8);
	forge_u64(prev, next);		/* prev->next */
	forge_u64(next + 8, prev);	/* next->prev */
	return at - tasks_off;
}

int main(void)
{
	uint64_t pgd_va, note_pa, task;
	char *note, *line;
	unsigned long note_len;
	int64_t phys_base;
	int i, note_page;
	FILE *f;

	/* Its own memory, before anything else: the heap stays small. */
	pool = mmap(NULL, POOL * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (pool == MAP_FAILED || mlock(pool, POOL * PAGE))
		die("cannot map and lock the forger's pages");
	memset(pool, 0, POOL * PAGE);
	for (i = 0; i < POOL; i++)
		pool_pa[i] = phys_of(pool + i * PAGE);
	kcore_open();
	pgd_va = ksym("init_top_pgt") ?: ksym("swapper_pg_dir");
	if (!pgd_va || !ksym("page_offset_base"))
		die("no init_top_pgt or page_offset_base in /proc/kallsyms");
	kread(ksym("page_offset_base"), &direct_map, 8);

	/* The forged root, and swapper_pg_dir's own address mapped onto it. */
	pool_alloc();
	kread(pgd_va, pool_page(0), PAGE);
	remap(pgd_va, pool_pa[0]);
	task = hide_self();

	/* The kernel's own VMCOREINFO, with the page-table root moved to the copy. */
	f = fopen("/sys/kernel/vmcoreinfo", "r");
	if (!f || fscanf(f, "%" SCNx64 " %lx", &note_pa, &note_len) != 2)
		die("cannot read /sys/kernel/vmcoreinfo");
	fclose(f);
	{
		Elf64_Nhdr nh;

		/* The note's header, then its name ("VMCOREINFO\0", padded to 12), then the text. */
		kread(direct_map + note_pa, &nh, sizeof(nh));
		if (nh.n_namesz != 11 || nh.n_descsz == 0 || nh.n_descsz >= PAGE)
			die("the kernel's VMCOREINFO note is not what it should be");
		note = calloc(1, PAGE);
		if (!note)
			die("out of memory");
		kread(direct_map + note_pa + sizeof(nh) + 12, note, nh.n_descsz);
	}
	phys_base = (int64_t)pool_pa[0] - (int64_t)(pgd_va - START_KERNEL_MAP);
	line = strstr(note, "NUMBER(phys_base)=");
	if (!line)
		die("the kernel's VMCOREINFO has no NUMBER(phys_base)");
	note_page = pool_alloc();
	{
		char *end = strchr(line, '\n');
		char *out = (char *)pool_page(note_page);
		int n = (int)(line - note);

		memcpy(out, note, n);
		n += snprintf(out + n, PAGE - n, "NUMBER(phys_base)=%" PRId64, phys_base);
		if (end)
			snprintf(out + n, PAGE - n, "%s", end);
	}
	/*
	 * The genuine text in the heap goes: a page of it that happens to sit just
	 * below the forged page in physical memory would read, across the page
	 * boundary, as a second forged copy.
	 */
	explicit_bzero(note, PAGE);
	free(note);
	printf("forger pid=%d vmcoreinfo_pa=%#" PRIx64 " task=%#" PRIx64 " hidden=1\n", getpid(),
	       pool_pa[note_page], task);
	fflush(stdout);
	for (;;)
		pause();
}
