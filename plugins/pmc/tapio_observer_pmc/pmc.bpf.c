/* Tapio pmc observer: per-CPU counter readings on a sampling timer.
 *
 * A software cpu-clock perf event fires this program on every CPU once per
 * interval (userspace attaches it, one per CPU). It reads the three counters
 * userspace opened for that CPU into the PMC_* perf arrays and sends one
 * record with their cumulative values. Userspace takes deltas: the kernel
 * side keeps no state, so a lost record costs one interval's resolution,
 * never a wrong ratio.
 *
 * A counter userspace could not open leaves its array slot empty; reading it
 * fails and its bit stays clear in `valid`, so every record says which
 * counters it carries (replay needs nothing else).
 */
#include <uapi/linux/bpf_perf_event.h>

/* Enough slots for any CPU id userspace opens a counter on (it checks). */
#ifndef PMC_MAX_CPUS
#define PMC_MAX_CPUS 1024
#endif

BPF_PERF_ARRAY(pmc_cycles, PMC_MAX_CPUS);
BPF_PERF_ARRAY(pmc_instructions, PMC_MAX_CPUS);
BPF_PERF_ARRAY(pmc_stall_cycles, PMC_MAX_CPUS);

/* Bits of pmc_record.valid; indexes of counter[], enabled[], running[]. */
#define PMC_CYCLES 0
#define PMC_INSTRUCTIONS 1
#define PMC_STALL_CYCLES 2

/* Mirrors PMC_RECORD in records.py. */
struct pmc_record {
    u64 timestamp_ns;
    u64 counter[3];   /* cumulative count since the counter was opened */
    u64 enabled[3];   /* ns the counter was enabled; running < enabled: multiplexed */
    u64 running[3];
    u32 cpu;
    u32 valid;
};

static __always_inline void pmc_take(struct pmc_record *rec, int index, long err,
                                     struct bpf_perf_event_value *value)
{
    if (err != 0)
        return;
    rec->counter[index] = value->counter;
    rec->enabled[index] = value->enabled;
    rec->running[index] = value->running;
    rec->valid |= 1 << index;
}

int pmc_sample(struct bpf_perf_event_data *ctx)
{
    struct pmc_record rec = {};
    struct bpf_perf_event_value value = {};
    long err;

    rec.timestamp_ns = bpf_ktime_get_ns();
    rec.cpu = bpf_get_smp_processor_id();
    /* bcc rewrites map.method() calls by the map's literal name: one call per counter. */
    err = pmc_cycles.perf_counter_value(CUR_CPU_IDENTIFIER, &value, sizeof(value));
    pmc_take(&rec, PMC_CYCLES, err, &value);
    err = pmc_instructions.perf_counter_value(CUR_CPU_IDENTIFIER, &value, sizeof(value));
    pmc_take(&rec, PMC_INSTRUCTIONS, err, &value);
    err = pmc_stall_cycles.perf_counter_value(CUR_CPU_IDENTIFIER, &value, sizeof(value));
    pmc_take(&rec, PMC_STALL_CYCLES, err, &value);
    tapio_submit(&rec, sizeof(rec));
    return 0;
}
