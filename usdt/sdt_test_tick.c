/* A USDT probe without a semaphore (it always fires), with a constant and a computed
 * argument; a separate file because _SDT_HAS_SEMAPHORES applies to a whole file. */
#include <sys/sdt.h>

extern volatile long sink;

void tick(long id)
{
    STAP_PROBE2(otel_test, tick, 42, id * 3);
    sink += id;
}
