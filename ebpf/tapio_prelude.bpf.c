/* Put by the agent at the top of every observer's BPF program (see tapio.h). */
#include <tapio.h>

/* The agent sets TAPIO_RING_PAGES (a power of two) from the observer's ring_pages setting. */
#ifndef TAPIO_RING_PAGES
#define TAPIO_RING_PAGES 64
#endif
BPF_RINGBUF_OUTPUT(events, TAPIO_RING_PAGES);
BPF_PERCPU_ARRAY(tapio_lost, u64, 1);

/* Adds one to a count in a per-CPU array (an observer's counters, which tapio status shows): this
 * CPU's copy is uncontended, but an interrupt may run another program mid-update, so the add is atomic. */
static __always_inline void tapio_count(u64 *value)
{
    if (value)
        lock_xadd(value, 1);
}

/* Sends one record; a full ring buffer is counted in tapio_lost, never silent.
 * Returns 0 when sent, so a caller can keep what the record carried (e.g. a
 * suppressed count) for the next one. */
static __always_inline int tapio_submit(void *record, u32 size)
{
    int err = events.ringbuf_output(record, size, 0);
    if (err != 0) {
        int zero = 0;
        tapio_count(tapio_lost.lookup(&zero));
    }
    return err;
}

/* A kernel pointer's slot in a table of 2^bits: Fibonacci hashing, whose top bits of the product spread
 * pointers evenly (their low bits are alignment, their high bits shared by a whole slab). */
static __always_inline u32 tapio_pointer_slot(u64 pointer, int bits)
{
    return (u32)((pointer * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
}

/* Compare-and-swap of a u64 another CPU may be changing: 1 when *word was expected and is now
 * desired. Where the verifier has no BPF atomics (before Linux 5.12; the agent defines
 * TAPIO_BPF_ATOMICS where it has them), a hash map insert with BPF_NOEXIST, which the kernel makes
 * atomic, takes a lock on the word's address for the compare and the store: of CPUs racing on one
 * word, one wins and the others fail, as with the instruction. Tracing programs cannot use
 * bpf_spin_lock. Plain stores to the word elsewhere are not ordered against the emulation. */
#ifndef TAPIO_BPF_ATOMICS
BPF_HASH(tapio_cas_locks, u64, u8, 1024);
#endif

static __always_inline int tapio_cas(u64 *word, u64 expected, u64 desired)
{
#ifdef TAPIO_BPF_ATOMICS
    return __sync_val_compare_and_swap(word, expected, desired) == expected;
#else
    u64 lock = (u64)word;
    u8 held = 1;
    if (tapio_cas_locks.insert(&lock, &held) != 0)
        return 0;  /* another CPU is swapping this word now: it wins */
    int swapped = *word == expected;
    if (swapped)
        *word = desired;
    tapio_cas_locks.delete(&lock);
    return swapped;
#endif
}

/* Takes the whole of a count that other CPUs add to (with __sync_fetch_and_add, result unused:
 * the atomic every supported kernel accepts): every event counted is taken exactly once. */
static __always_inline u64 tapio_take(u64 *counter)
{
#ifdef TAPIO_BPF_ATOMICS
    return __sync_lock_test_and_set(counter, 0);  /* an atomic exchange */
#else
    u64 lock = (u64)counter;
    u8 held = 1;
    if (tapio_cas_locks.insert(&lock, &held) != 0)
        return 0;  /* another CPU is taking it now: it gets the count */
    u64 taken = *counter;
    if (taken)
        __sync_fetch_and_add(counter, -taken);  /* adds that raced in since the read stay */
    tapio_cas_locks.delete(&lock);
    return taken;
#endif
}

/* A token bucket limiting one key's records (a destination, a device): credit in nanoseconds,
 * earned with time up to the burst, each record costing cost_ns. A zeroed limit starts full. */
struct tapio_limit {
    u64 credit_ns;
    u64 last_ns;
    u64 suppressed;  /* held back since this key's last record */
};

/* 1: send the record now, *suppressed set to what was held back before it (taken from the limit);
 * 0: hold it back (counted in limit->suppressed). cost_ns 0 (not configured yet) limits nothing.
 * CPUs racing on one key may lose a credit update, never a suppressed count. */
static __always_inline int tapio_limit_allows(struct tapio_limit *limit, u64 now, u64 cost_ns, u64 burst_ns,
                                              u32 *suppressed)
{
    u64 last = limit->last_ns;
    u64 credit = !last ? burst_ns : limit->credit_ns + (now > last ? now - last : 0);  /* zeroed: full */
    if (credit > burst_ns)
        credit = burst_ns;
    limit->last_ns = now;
    if (credit < cost_ns) {
        limit->credit_ns = credit;
        __sync_fetch_and_add(&limit->suppressed, 1);
        return 0;
    }
    limit->credit_ns = credit - cost_ns;
    *suppressed = limit->suppressed ? tapio_take(&limit->suppressed) : 0;
    return 1;
}
