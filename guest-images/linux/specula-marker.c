/*
 * specula-marker: a guest process with known contents, for introspection tests.
 *
 *   specula-marker [--name COMM] [--tag WORD] [--uid N]
 *
 * Sets its own comm to COMM (prctl PR_SET_NAME, at most 15 bytes), drops to
 * uid/gid N if asked, puts a distinctive marker string in heap memory it
 * allocates and touches (malloc), prints one line to stdout
 *
 *   marker pid=PID comm=COMM uid=UID vaddr=0xADDR text=SPECULA-MARKER-PID-RANDOM
 *
 * and then sleeps forever. The text (and so the line) is unique per run: RANDOM
 * is 16 hex digits from getrandom (or the clock if that fails). An introspection
 * test finds the text in guest RAM and checks the process it walks to against
 * this line. Built static by guest-images/linux/build.sh (gcc -static -O2).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define MARKER_BYTES 4096

static void usage(void) {
    fprintf(stderr, "usage: specula-marker [--name COMM] [--tag WORD] [--uid N]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *name = NULL;
    long uid = -1;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        if (strcmp(argv[i], "--name") == 0) {
            name = argv[++i];
        } else if (strcmp(argv[i], "--tag") == 0) {
            ++i; /* only there to make the command line distinctive */
        } else if (strcmp(argv[i], "--uid") == 0) {
            uid = strtol(argv[++i], NULL, 10);
        } else {
            usage();
        }
    }
    if (name != NULL && prctl(PR_SET_NAME, name, 0, 0, 0) != 0) {
        perror("specula-marker: prctl(PR_SET_NAME)");
        return 1;
    }
    if (uid >= 0 && (setgid((gid_t)uid) != 0 || setuid((uid_t)uid) != 0)) {
        perror("specula-marker: setuid");
        return 1;
    }

    uint64_t random = 0;
    if (getrandom(&random, sizeof random, 0) != (ssize_t)sizeof random) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        random = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 48);
    }

    /* A page of heap, every byte written so it is backed by guest RAM. */
    char *marker = malloc(MARKER_BYTES);
    if (marker == NULL) {
        perror("specula-marker: malloc");
        return 1;
    }
    memset(marker, 0, MARKER_BYTES);
    snprintf(marker, MARKER_BYTES, "SPECULA-MARKER-%ld-%016llx", (long)getpid(), (unsigned long long)random);

    char comm[17] = {0};
    prctl(PR_GET_NAME, comm, 0, 0, 0);
    printf("marker pid=%ld comm=%s uid=%ld vaddr=%p text=%s\n", (long)getpid(), comm, (long)getuid(),
           (void *)marker, marker);
    fflush(stdout);

    for (;;) pause();
}
