/* Put by the agent at the top of every observer's BPF program (see tapio.h). */
#include <tapio.h>

/* An observer may set TAPIO_RING_PAGES (a power of two) with a -D flag. */
#ifndef TAPIO_RING_PAGES
#define TAPIO_RING_PAGES 64
#endif
BPF_RINGBUF_OUTPUT(events, TAPIO_RING_PAGES);
BPF_PERCPU_ARRAY(tapio_lost, u64, 1);

/* Sends one record; a full ring buffer is counted in tapio_lost, never silent.
 * Returns 0 when sent, so a caller can keep what the record carried (e.g. a
 * suppressed count) for the next one. */
static __always_inline int tapio_submit(void *record, u32 size)
{
    int err = events.ringbuf_output(record, size, 0);
    if (err != 0) {
        int zero = 0;
        u64 *lost = tapio_lost.lookup(&zero);
        if (lost)
            (*lost)++;
    }
    return err;
}
