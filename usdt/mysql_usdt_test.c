/* A stand-in for a MySQL 5.x server built with DTrace probes, so that the mysql
 * target's USDT path can be proven on a machine where no server has them.
 *
 * It fires the `mysql` provider's probes with MySQL 5.x's argument types
 * (probes_mysql.d):
 *   query__start(const char *query, unsigned long connid, const char *db,
 *                const char *user, const char *host)
 *   query__done(int status)               status = thd->is_error()
 * each guarded by its semaphore, as `dtrace -G` builds do: nothing fires until a
 * tracer (here: the kernel, through uprobe ref_ctr_offset) raises the semaphore.
 * A failing query calls my_message_sql(errno, msg, flags) first, the hook every
 * MySQL error goes through.
 *
 * Protocol: one query per line on stdin, tab-separated
 *   connid  db  user  host  sleep_ms  status  errno  query...
 * ("-" for an empty db); after query__done it prints "ok <n>" on stdout.
 * A line "exit" or end of input ends the program.
 *
 * Build: gcc -O2 -o mysql_usdt_test mysql_usdt_test.c
 */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__extension__ unsigned short mysql_query__start_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));
__extension__ unsigned short mysql_query__done_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));

/* noipa: a real call the uprobe sees, never inlined, cloned or dropped. */
__attribute__((noipa)) void my_message_sql(unsigned int error, const char *str, unsigned long flags)
{
    __asm__ __volatile__("" ::"r"(error), "r"(str), "r"(flags) : "memory");
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* Splits the next tab-separated field off *line; NULL when none is left. */
static char *next_field(char **line)
{
    char *start = *line;
    if (start == NULL)
        return NULL;
    char *tab = strchr(start, '\t');
    if (tab) {
        *tab = '\0';
        *line = tab + 1;
    } else {
        *line = NULL;
    }
    return start;
}

static int run_query(char *line)
{
    char *connid = next_field(&line);
    char *db = next_field(&line);
    char *user = next_field(&line);
    char *host = next_field(&line);
    char *sleep_text = next_field(&line);
    char *status_text = next_field(&line);
    char *errno_text = next_field(&line);
    char *query = line;
    if (query == NULL || errno_text == NULL)
        return -1;
    if (strcmp(db, "-") == 0)
        db = "";

    unsigned long connection_id = strtoul(connid, NULL, 10);
    int status = atoi(status_text);
    unsigned int error = (unsigned int)strtoul(errno_text, NULL, 10);

    if (mysql_query__start_semaphore)
        STAP_PROBE5(mysql, query__start, query, connection_id, db, user, host);
    sleep_ms(atol(sleep_text));
    if (error)
        my_message_sql(error, "simulated error", 0);
    if (mysql_query__done_semaphore)
        STAP_PROBE1(mysql, query__done, status);
    return 0;
}

int main(void)
{
    char buf[65536];
    long n = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(buf, sizeof(buf), stdin)) {
        buf[strcspn(buf, "\n")] = '\0';
        if (strcmp(buf, "exit") == 0)
            break;
        if (run_query(buf) != 0) {
            printf("bad line\n");
            continue;
        }
        printf("ok %ld\n", ++n);
    }
    return 0;
}
