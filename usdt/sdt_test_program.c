/* A small program with USDT probes for the ELF/USDT unit tests: probes with and
 * without semaphores, and arguments that gcc places in registers, in memory and
 * as constants. Built by tests/unit/test_elf.py with:
 *   cc -O2 -o prog sdt_test_program.c sdt_test_tick.c
 */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Semaphores as `dtrace -G` would emit them: <provider>_<probe>_semaphore in .probes. */
__extension__ unsigned short otel_test_query__start_semaphore __attribute__((unused, section(".probes")));
__extension__ unsigned short otel_test_query__done_semaphore __attribute__((unused, section(".probes")));

volatile long sink;
void tick(long id); /* sdt_test_tick.c: a probe without a semaphore */

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    const char *query = argc > 2 ? argv[2] : "SELECT 1";
    for (int i = 0; i < rounds; i++) {
        long id = (long)i * 7 + argc;
        if (otel_test_query__start_semaphore)
            STAP_PROBE3(otel_test, query__start, query, id, (int)strlen(query));
        usleep(1000);
        if (otel_test_query__done_semaphore)
            STAP_PROBE2(otel_test, query__done, query, 0);
        tick(id);
        sink += id;
    }
    return 0;
}
