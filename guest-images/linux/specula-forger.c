/*
 * specula-forger: a guest user process that forges a Linux kernel in its own
 * pages, the way an attacker would mislead an introspection tool that finds the
 * kernel from RAM alone.
 *
 * It copies the kernel's top-level page table (swapper_pg_dir) and the tables
 * on the path to swapper_pg_dir's own address into its pages, maps that address
 * onto its copy, and writes a copy of the kernel's VMCOREINFO whose phys_base
 * puts the page-table root in its copy. Through the copy every kernel address
 * reads what it reads through the kernel's tables (kallsyms, BTF, the task
 * list: a forger would redirect some to hide), so the copy passes every test a
 * discovery from RAM alone can apply: it is a second, valid, self-consistent
 * kernel. Only the vCPUs' CR3s say which one runs.
 *
 * It needs the physical addresses of its pages (/proc/self/pagemap shows PFNs
 * to CAP_SYS_ADMIN only) and kernel memory (/proc/kcore), so the test runs it as
 * root; it writes nothing but its own memory. It prints
 * "forger pid=PID vmcoreinfo_pa=PA" and waits to be killed.
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

int main(void)
{
	/* Pages: the forged root, PDPT, PD, PT, then the VMCOREINFO text. */
	uint8_t *pages = mmap(NULL, 5 * PAGE, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	uint64_t *table[4], pa[5], pgd_va, direct_map, note_pa, entry;
	char *note, *line;
	unsigned long note_len;
	int64_t phys_base;
	int level, i;
	FILE *f;

	if (pages == MAP_FAILED || mlock(pages, 5 * PAGE))
		die("cannot map and lock five pages");
	memset(pages, 0, 5 * PAGE);
	for (i = 0; i < 5; i++)
		pa[i] = phys_of(pages + i * PAGE);
	for (i = 0; i < 4; i++)
		table[i] = (uint64_t *)(pages + i * PAGE);
	kcore_open();
	pgd_va = ksym("init_top_pgt") ?: ksym("swapper_pg_dir");
	if (!pgd_va || !ksym("page_offset_base"))
		die("no init_top_pgt or page_offset_base in /proc/kallsyms");
	kread(ksym("page_offset_base"), &direct_map, 8);

	/* The path to pgd_va, each table copied; the last entry maps it onto the copy. */
	kread(pgd_va, table[0], PAGE);
	for (level = 0; level < 3; level++) {
		int index = (pgd_va >> (39 - 9 * level)) & 511;

		entry = table[level][index];
		if (!(entry & 1))
			die("swapper_pg_dir's own address is not mapped");
		if (level > 0 && (entry & PS)) {
			/* A large page (the image's 2 MiB mappings): split it into a table. */
			uint64_t base = entry & ADDR_MASK & ~((1UL << (39 - 9 * level)) - 1);
			uint64_t flags = (entry & 0x7fUL & ~PS) | (entry & (1UL << 63));

			for (i = 0; i < 512; i++)
				table[level + 1][i] = (base + i * PAGE) | flags;
			if (level == 1)
				die("swapper_pg_dir sits in a 1 GiB page: not handled");
		} else {
			kread(direct_map + (entry & ADDR_MASK), table[level + 1], PAGE);
		}
		table[level][index] = pa[level + 1] | (entry & 0xfffUL & ~PS) | (entry & (1UL << 63));
	}
	table[3][(pgd_va >> 12) & 511] = pa[0] | 0x63;

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
	phys_base = (int64_t)pa[0] - (int64_t)(pgd_va - START_KERNEL_MAP);
	line = strstr(note, "NUMBER(phys_base)=");
	if (!line)
		die("the kernel's VMCOREINFO has no NUMBER(phys_base)");
	{
		char *end = strchr(line, '\n');
		char *out = (char *)pages + 4 * PAGE;
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
	printf("forger pid=%d vmcoreinfo_pa=%#" PRIx64 "\n", getpid(), pa[4]);
	fflush(stdout);
	for (;;)
		pause();
}
