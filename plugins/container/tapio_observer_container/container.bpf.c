/* Tapio container observer: OOM kills and abnormal process exits.
 *
 * sched_process_exit fires once per thread; group_dead marks the last thread
 * of a process (older kernels lack it: see last_thread_first_claim), so that
 * is where a process exit is judged, with the status its parent's wait() sees. Only exits that mean
 * trouble cross the ring buffer: a death by a signal of reported_signals (SIGSEGV, SIGABRT, ...), and a
 * non-zero exit of a container's main process (its PID namespace's init) or of a process that ran at
 * least min_runtime_ns. Other non-zero exits (probes, scripts, `grep -q` finding nothing) are counted
 * per cgroup in quiet_exits and carried on the cgroup's next record. A main process exiting again and
 * again (a crash loop, restarted in a new cgroup each time) is one record per crash-loop window per pod
 * cgroup and process name, carrying how many exits it stands for; other exits are rate-limited per
 * cgroup and kind. Exits the user declared normal (codes, signals, names) are dropped here too.
 *
 * oom/mark_victim runs in the context of whoever triggered the OOM, not the
 * victim: the raw tracepoint hands us the victim's task_struct (kernels before
 * about 6.8 hand a pid: there the task comes from the SIGKILL the OOM killer
 * sent it just before, see signal_generate below), and its memory cgroup,
 * limit, usage and RSS are read from it at BTF offsets. The kernel marks a
 * victim (signal_struct.oom_mm) before it can die, so its exit is never a
 * second report; it is the first where the mark gave no task or comes later.
 *
 * Nothing is reported until tapio_observer_started has written the kernel
 * facts and the user's filters into container_layout / exit_filter.
 */
#include <tapio.h>  /* the agent puts events, tapio_lost and tapio_submit() before this */

#define KIND_ABNORMAL_EXIT 1
#define KIND_OOM_KILL      2

/* Which facts the kernel gave us; mirrors FLAG_* in records.py. */
#define FLAG_CGROUP         (1 << 0)
#define FLAG_MEMORY         (1 << 1)
#define FLAG_LIMITED        (1 << 2)
#define FLAG_RSS            (1 << 3)
#define FLAG_OOM_SCORE_ADJ  (1 << 4)
#define FLAG_PATH_TRUNCATED (1 << 5)
#define FLAG_TRIGGER        (1 << 6)
/* the process was its PID namespace's init: a container's main process */
#define FLAG_MAIN_PROCESS   (1 << 7)

#define CGROUP_V1 1
#define CGROUP_V2 2

#define SIGKILL 9
#define SEND_SIG_PRIV 1               /* include/linux/sched/signal.h: the siginfo of a kernel-sent signal */
#define SIGNAL_GROUP_EXIT 0x00000004  /* include/linux/sched/signal.h, unchanged since 2.6 */
#define KILLER_STACK_DEPTH 24         /* signal_generate is ~8 frames below out_of_memory() */
#ifndef TAPIO_PF_KTHREAD              /* a -D flag may name another task flag (the tests do) */
#define TAPIO_PF_KTHREAD  0x00200000  /* include/linux/sched.h: task_struct.flags of a kernel thread */
#endif
#define CGROUP_SUBSYS_MAX 64          /* only bounds a map-supplied index */
#define CGROUP_PATH_LEN   256         /* a power of two: the path builder masks with it */
#define CGROUP_PATH_DEPTH 16

/* Mirrors CONTAINER_RECORD in tapio_observer_container/records.py. */
struct container_record {
    u64 timestamp_ns;
    struct tapio_task task;      /* the process: pid, last/victim thread, its cgroup, the leader's comm */
    u64 memory_limit_bytes;
    u64 memory_usage_bytes;
    u64 file_rss_bytes;
    u64 anon_rss_bytes;
    u64 shmem_rss_bytes;
    u32 kind;
    u32 exit_status;             /* as wait() reports it: code << 8 | 0x80 if core dumped | signal */
    u32 trigger_pid;             /* OOM: the task whose allocation invoked the OOM killer (FLAG_TRIGGER) */
    s16 oom_score_adj;
    u8 flags;
    u8 cgroup_mode;              /* which hierarchy task.cgroup_id numbers */
    char trigger_comm[16];
    char cgroup_path[CGROUP_PATH_LEN];
    u64 runtime_ns;              /* abnormal exit: how long the process ran (0 when unknown) */
    u32 suppressed;              /* this cgroup's exits of this kind held back by the rate limit since its last */
    u32 crash_loop_exits;        /* main process: its earlier exits folded into this record (a crash loop) */
    u32 quiet_exits;             /* short-lived non-zero exits in this cgroup since its last record */
    u32 reserved;
};

/* Kernel facts that cannot come as -D macros (an enum value, a renamed member,
 * array strides); written by tapio_observer_started from BTF. Offsets are -1
 * when this kernel lacks them. Mirrors KernelLayout in layout.py. */
struct kernel_layout {
    u64 page_size;
    u64 unlimited_pages;         /* PAGE_COUNTER_MAX: a memory.max of "max" */
    s64 memory_cgrp_id;
    s64 kn_parent_offset;
    s64 rss_file_offset;
    s64 rss_anon_offset;
    s64 rss_shmem_offset;
    u64 oom_killer_start;        /* out_of_memory() in kernel text (kallsyms); 0 when unknown */
    u64 oom_killer_end;
    s64 upid_size;               /* stride of struct pid's numbers[] */
    u32 cgroup_mode;
    u32 configured;
};

/* Which exits are reported, and how often; mirrors exit_policy() in __init__.py. */
struct exit_filter {
    u64 ignored_exit_codes[4];   /* bit n: exit code n is normal here (0..255) */
    u64 reported_signals[2];     /* bit n: a death by signal n is reported (1..127) */
    u64 min_runtime_ns;          /* a non-main process's non-zero exit is reported once it ran this long */
    u64 record_cost_ns;          /* per cgroup and kind: a record costs this much credit... */
    u64 record_burst_ns;         /* ...of a bucket this big */
    u64 crash_loop_ns;           /* per pod cgroup and name: one main-process exit per this long */
};

/* The rate-limit keys: a cgroup and a kind of exit, or (crash loops) a pod cgroup and a process name. */
#define LIMIT_SIGNALED   1
#define LIMIT_EXIT_CODE  2
#define LIMIT_CRASH_LOOP 3
struct limit_key {
    u64 cgroup_id;
    u32 kind;
    u32 pad;
    char comm[16];
};

/* Counts the agent reads every second (BpfCounter in __init__.py). */
#define COUNT_QUIET_EXITS 0  /* short-lived non-zero exits, not reported one by one */
#define COUNT_SUPPRESSED  1  /* exits held back by a rate limit or folded into a crash loop's record */
BPF_PERCPU_ARRAY(container_counts, u64, 2);

struct comm_key {
    char comm[16];
};

/* One process, whatever pids get reused: its tgid and its leader's start time. */
struct process_key {
    u32 tgid;
    u32 pad;
    u64 start_time;
};

struct path_scratch {
    char buf[2 * CGROUP_PATH_LEN];
    u64 nodes[CGROUP_PATH_DEPTH];
};

BPF_ARRAY(container_layout, struct kernel_layout, 1);
BPF_ARRAY(exit_filter, struct exit_filter, 1);
BPF_HASH(ignored_process_names, struct comm_key, u8, 1024);
BPF_TABLE("lru_hash", struct limit_key, struct tapio_limit, exit_limits, 4096);
BPF_TABLE("lru_hash", u64, u64, quiet_exits, 4096);  /* cgroup id -> short-lived non-zero exits not yet carried */
/* OOM victims claimed for their one oom_kill, by their mark or by their exit, whichever came first: the
 * claim is an insert (BPF_NOEXIST), which the kernel makes atomic, so a mark and an exit racing on two
 * CPUs cannot both report. */
BPF_TABLE("lru_hash", struct process_key, u8, oom_victims, 4096);
/* Records and paths are too big for the 512-byte BPF stack. */
BPF_PERCPU_ARRAY(record_scratch, struct container_record, 1);
BPF_PERCPU_ARRAY(path_scratch, struct path_scratch, 1);

static __always_inline int bit_is_set(const u64 *words, u32 n, u32 nwords)
{
    u32 word = n >> 6;
    if (word >= nwords)
        return 0;
    return (words[word] >> (n & 63)) & 1;
}

static __always_inline const void *read_ptr(const void *base, s64 offset)
{
    const void *ptr = NULL;
    if (base && offset >= 0)
        bpf_probe_read_kernel(&ptr, sizeof(ptr), (const char *)base + offset);
    return ptr;
}

/* tgid plus the leader's start time names one process, whatever pids get reused. */
static __always_inline u64 process_start_time(const void *task)
{
    u64 start_time = 0;
#if defined(TAPIO_TASK_GROUP_LEADER_OFFSET) && defined(TAPIO_TASK_START_TIME_OFFSET)
    const void *leader = read_ptr(task, TAPIO_TASK_GROUP_LEADER_OFFSET);
    if (leader)
        TAPIO_READ_AT(start_time, leader, TAPIO_TASK_START_TIME_OFFSET);
#endif
    return start_time;
}

/* The status a parent's wait() gets: the group's exit code once a group exit
 * (exit_group, fatal signal, core dump) began, else the leader's own.
 *
 * Fast path for the common case, a leader exiting with 0: one read. Its 0 is
 * the group's too -- a group exit gives every thread the group code of the
 * moment, and that code only changes from 0 by a core dump, which cannot
 * start once a group exit has. */
static __always_inline u32 process_exit_status(const void *task, int is_leader)
{
    u32 status = 0;
#ifdef TAPIO_TASK_EXIT_CODE_OFFSET
    if (is_leader && TAPIO_READ_AT(status, task, TAPIO_TASK_EXIT_CODE_OFFSET) == 0 && status == 0)
        return 0;
#endif
#if defined(TAPIO_TASK_SIGNAL_OFFSET) && defined(TAPIO_SIGNAL_FLAGS_OFFSET) && defined(TAPIO_SIGNAL_GROUP_EXIT_CODE_OFFSET)
    const void *signal = read_ptr(task, TAPIO_TASK_SIGNAL_OFFSET);
    if (signal) {
        u32 flags = 0;
        TAPIO_READ_AT(flags, signal, TAPIO_SIGNAL_FLAGS_OFFSET);
        if (flags & SIGNAL_GROUP_EXIT) {
            TAPIO_READ_AT(status, signal, TAPIO_SIGNAL_GROUP_EXIT_CODE_OFFSET);
            return status;
        }
    }
#endif
#ifdef TAPIO_TASK_EXIT_CODE_OFFSET
    const void *leader = task;
#ifdef TAPIO_TASK_GROUP_LEADER_OFFSET
    if (!is_leader)
        leader = read_ptr(task, TAPIO_TASK_GROUP_LEADER_OFFSET);
    if (!leader)
        leader = task;
#endif
    status = 0;
    TAPIO_READ_AT(status, leader, TAPIO_TASK_EXIT_CODE_OFFSET);
#endif
    return status;
}

/* The process name: the leader's comm (the last thread's may be a worker's). */
static __always_inline void read_process_name(const void *task, struct container_record *rec)
{
#if defined(TAPIO_TASK_GROUP_LEADER_OFFSET) && defined(TAPIO_TASK_COMM_OFFSET)
    const void *leader = read_ptr(task, TAPIO_TASK_GROUP_LEADER_OFFSET);
    if (leader && bpf_probe_read_kernel_str(rec->task.comm, sizeof(rec->task.comm),
                                            (const char *)leader + TAPIO_TASK_COMM_OFFSET) > 0)
        return;
#endif
#ifdef TAPIO_TASK_COMM_OFFSET
    bpf_probe_read_kernel_str(rec->task.comm, sizeof(rec->task.comm), (const char *)task + TAPIO_TASK_COMM_OFFSET);
#endif
}

/* "/a/b/c" from a kernfs node, walking up to (not including) the hierarchy's root. */
static __always_inline void read_cgroup_path(const void *kn, const struct kernel_layout *layout,
                                             struct container_record *rec)
{
#ifdef TAPIO_KERNFS_NODE_NAME_OFFSET
    int zero = 0;
    struct path_scratch *scratch = path_scratch.lookup(&zero);
    if (!scratch || layout->kn_parent_offset < 0)
        return;
    u32 depth = 0;
    int reached_root = 0;
    for (int i = 0; i < CGROUP_PATH_DEPTH; i++) {
        const void *parent = read_ptr(kn, layout->kn_parent_offset);
        if (!parent) {
            reached_root = 1;
            break;
        }
        scratch->nodes[i] = (u64)kn;
        depth = i + 1;
        kn = parent;
    }
    if (!reached_root) {
        const void *parent = read_ptr(kn, layout->kn_parent_offset);
        reached_root = parent == NULL;
    }
    u32 off = 0;
    scratch->buf[0] = '/';
    scratch->buf[1] = 0;
    int truncated = !reached_root;
    for (int i = CGROUP_PATH_DEPTH - 1; i >= 0; i--) {
        if ((u32)i >= depth)
            continue;
        if (off >= CGROUP_PATH_LEN - 1) {
            truncated = 1;
            break;
        }
        const char *name = read_ptr((const void *)scratch->nodes[i], TAPIO_KERNFS_NODE_NAME_OFFSET);
        /* off < CGROUP_PATH_LEN: the masks change nothing but prove it to the verifier; the
         * empty asm keeps the compiler from dropping them as redundant. */
        asm volatile("" : "+r"(off));
        scratch->buf[off & (CGROUP_PATH_LEN - 1)] = '/';
        off++;
        asm volatile("" : "+r"(off));
        long n = bpf_probe_read_kernel_str(&scratch->buf[off & (CGROUP_PATH_LEN - 1)], CGROUP_PATH_LEN, name);
        if (n > 0)
            off += n - 1;
    }
    if (off >= CGROUP_PATH_LEN)
        truncated = 1;
    bpf_probe_read_kernel_str(rec->cgroup_path, CGROUP_PATH_LEN, scratch->buf);
    if (truncated)
        rec->flags |= FLAG_PATH_TRUNCATED;
#endif
}

static __always_inline const void *memory_css(const void *cset, const struct kernel_layout *layout)
{
#ifdef TAPIO_CSS_SET_SUBSYS_OFFSET
    s64 id = layout->memory_cgrp_id;
    if (cset && id >= 0 && id < CGROUP_SUBSYS_MAX)
        return read_ptr(cset, TAPIO_CSS_SET_SUBSYS_OFFSET + id * sizeof(void *));
#endif
    return NULL;
}

/* The cgroup that names the container: the memory cgroup on cgroup v1, the
 * task's default (unified) cgroup on v2 -- and on v1 when the memory cgroup
 * cannot be read. Its kernfs id is the inode of its directory, and what
 * bpf_get_current_cgroup_id() returns for the unified one. */
static __always_inline const void *cgroup_node(const void *task, const struct kernel_layout *layout,
                                               struct container_record *rec)
{
    rec->cgroup_mode = CGROUP_V2;
#if defined(TAPIO_TASK_CGROUPS_OFFSET) && defined(TAPIO_CGROUP_KN_OFFSET) && defined(TAPIO_KERNFS_NODE_ID_OFFSET)
    const void *cset = read_ptr(task, TAPIO_TASK_CGROUPS_OFFSET);
    const void *cgrp = NULL;
#ifdef TAPIO_CSS_CGROUP_OFFSET
    if (layout->cgroup_mode == CGROUP_V1) {
        cgrp = read_ptr(memory_css(cset, layout), TAPIO_CSS_CGROUP_OFFSET);
        if (cgrp)
            rec->cgroup_mode = CGROUP_V1;
    }
#endif
#ifdef TAPIO_CSS_SET_DFL_CGRP_OFFSET
    if (!cgrp)
        cgrp = read_ptr(cset, TAPIO_CSS_SET_DFL_CGRP_OFFSET);
#endif
    const void *kn = read_ptr(cgrp, TAPIO_CGROUP_KN_OFFSET);
    if (kn && TAPIO_READ_AT(rec->task.cgroup_id, kn, TAPIO_KERNFS_NODE_ID_OFFSET) == 0) {
        rec->flags |= FLAG_CGROUP;
        return kn;
    }
#endif
    return NULL;
}

/* The cgroup's id, its path, and (returned) its parent's id: a pod's, for a container's cgroup. */
static __always_inline u64 read_cgroup(const void *task, const struct kernel_layout *layout,
                                       struct container_record *rec)
{
    u64 parent_id = 0;
    const void *kn = cgroup_node(task, layout, rec);
    if (!kn)
        return 0;
    read_cgroup_path(kn, layout, rec);
#ifdef TAPIO_KERNFS_NODE_ID_OFFSET
    const void *parent = read_ptr(kn, layout->kn_parent_offset);
    if (parent)
        TAPIO_READ_AT(parent_id, parent, TAPIO_KERNFS_NODE_ID_OFFSET);
#endif
    return parent_id;
}

/* Limit and usage of the task's memory cgroup (the nearest with the controller on v2); the usage only
 * with_usage: once a victim's memory is freed it no longer tells what the cgroup held at the kill. */
static __always_inline void read_memory(const void *task, const struct kernel_layout *layout,
                                        struct container_record *rec, int with_usage)
{
#if defined(TAPIO_TASK_CGROUPS_OFFSET) && defined(TAPIO_MEMCG_CSS_OFFSET) && defined(TAPIO_MEMCG_MAX_OFFSET) && \
    defined(TAPIO_MEMCG_USAGE_OFFSET)
    const char *css = memory_css(read_ptr(task, TAPIO_TASK_CGROUPS_OFFSET), layout);
    if (!css)
        return;
    const char *memcg = css - TAPIO_MEMCG_CSS_OFFSET;
    u64 max_pages = 0, usage_pages = 0;
    if (TAPIO_READ_AT(max_pages, memcg, TAPIO_MEMCG_MAX_OFFSET) || TAPIO_READ_AT(usage_pages, memcg, TAPIO_MEMCG_USAGE_OFFSET))
        return;
    if (with_usage) {
        rec->memory_usage_bytes = usage_pages * layout->page_size;
        rec->flags |= FLAG_MEMORY;
    }
    if (max_pages < layout->unlimited_pages) {
        rec->memory_limit_bytes = max_pages * layout->page_size;
        rec->flags |= FLAG_LIMITED;
    }
#endif
}

/* What the kernel's own OOM report prints (get_mm_counter: the counters' shared part). */
static __always_inline void read_rss(const void *task, const struct kernel_layout *layout,
                                     struct container_record *rec)
{
#ifdef TAPIO_TASK_MM_OFFSET
    const char *mm = read_ptr(task, TAPIO_TASK_MM_OFFSET);
    if (!mm || layout->rss_file_offset < 0 || layout->rss_anon_offset < 0 || layout->rss_shmem_offset < 0)
        return;
    s64 file = 0, anon = 0, shmem = 0;
    bpf_probe_read_kernel(&file, sizeof(file), mm + layout->rss_file_offset);
    bpf_probe_read_kernel(&anon, sizeof(anon), mm + layout->rss_anon_offset);
    bpf_probe_read_kernel(&shmem, sizeof(shmem), mm + layout->rss_shmem_offset);
    rec->file_rss_bytes = (file > 0 ? file : 0) * layout->page_size;
    rec->anon_rss_bytes = (anon > 0 ? anon : 0) * layout->page_size;
    rec->shmem_rss_bytes = (shmem > 0 ? shmem : 0) * layout->page_size;
    rec->flags |= FLAG_RSS;
#endif
}

static __always_inline struct container_record *fresh_record(u32 kind)
{
    int zero = 0;
    struct container_record *rec = record_scratch.lookup(&zero);
    if (!rec)
        return NULL;
    __builtin_memset(rec, 0, sizeof(*rec));
    rec->timestamp_ns = bpf_ktime_get_ns();
    rec->kind = kind;
    return rec;
}

static __always_inline const struct kernel_layout *configured_layout(void)
{
    int zero = 0;
    struct kernel_layout *layout = container_layout.lookup(&zero);
    return layout && layout->configured ? layout : NULL;
}

#ifndef TAPIO_EXIT_HAS_GROUP_DEAD
/* Processes whose exit was judged: several threads may all see signal->live == 0. */
BPF_TABLE("lru_hash", struct process_key, u8, exits_judged, 4096);

/* Without the tracepoint's group_dead (older kernels): do_exit() decremented
 * signal->live before the tracepoint, so 0 means the last thread -- but threads
 * dying together may all read 0 after the last decrement; the first to claim
 * the process in exits_judged is the one. */
static __always_inline int last_thread_first_claim(const void *task, u32 tgid)
{
#if defined(TAPIO_TASK_SIGNAL_OFFSET) && defined(TAPIO_SIGNAL_LIVE_OFFSET)
    int live = 1;
    const void *signal = read_ptr(task, TAPIO_TASK_SIGNAL_OFFSET);
    if (!signal || TAPIO_READ_AT(live, signal, TAPIO_SIGNAL_LIVE_OFFSET) || live != 0)
        return 0;
    struct process_key key = {.tgid = tgid, .start_time = process_start_time(task)};
    u8 one = 1;
    return exits_judged.insert(&key, &one) == 0;
#else
    return 0;  /* cannot tell the process's last thread: abnormal exits disabled */
#endif
}
#endif

/* Whether the process is its PID namespace's init (not the node's): a container's main process. Its
 * leader's struct pid numbers it in each namespace level; the innermost number is 1. */
static __always_inline int namespace_init(const void *task, const struct kernel_layout *layout)
{
#if defined(TAPIO_TASK_THREAD_PID_OFFSET) && defined(TAPIO_PID_LEVEL_OFFSET) && defined(TAPIO_PID_NUMBERS_OFFSET)
    const void *leader = task;
#ifdef TAPIO_TASK_GROUP_LEADER_OFFSET
    leader = read_ptr(task, TAPIO_TASK_GROUP_LEADER_OFFSET);
    if (!leader)
        return 0;
#endif
    const void *pid = read_ptr(leader, TAPIO_TASK_THREAD_PID_OFFSET);
    u32 level = 0;
    if (!pid || layout->upid_size <= 0 || TAPIO_READ_AT(level, pid, TAPIO_PID_LEVEL_OFFSET) || level == 0 ||
        level > 32)
        return 0;
    int nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), (const char *)pid + TAPIO_PID_NUMBERS_OFFSET + level * layout->upid_size);
    return nr == 1;
#else
    return 0;
#endif
}

static __always_inline void count_exit(int slot)
{
    tapio_count(container_counts.lookup(&slot));
}

/* One record allowed for key by its token bucket (the crash-loop window, or the cgroup's rate), with
 * what it held back since; else the exit is counted held back. */
static __always_inline int exit_allowed(struct limit_key *key, u64 now, u64 cost_ns, u64 burst_ns, u32 *held)
{
    struct tapio_limit fresh = {};
    struct tapio_limit *limit = exit_limits.lookup_or_try_init(key, &fresh);
    if (!limit)
        return 1;  /* no room to remember the key: not limited */
    if (tapio_limit_allows(limit, now, cost_ns, burst_ns, held))
        return 1;
    count_exit(COUNT_SUPPRESSED);
    return 0;
}

/* -- OOM kills ---------------------------------------------------------------------------------- */

/* The mm the OOM killer marked this process with (signal_struct.oom_mm: set by mark_oom_victim, kept as long as
 * the process's signal_struct): NULL for every process that is not an OOM victim. */
static __always_inline const void *oom_marked_mm(const void *task)
{
#if defined(TAPIO_TASK_SIGNAL_OFFSET) && defined(TAPIO_SIGNAL_OOM_MM_OFFSET)
    return read_ptr(read_ptr(task, TAPIO_TASK_SIGNAL_OFFSET), TAPIO_SIGNAL_OOM_MM_OFFSET);
#else
    return NULL;  /* cannot tell an OOM victim's exit: it is reported as an abnormal exit too */
#endif
}

/* Whether the task still has its memory: before Linux 6.16 sched_process_exit runs after exit_mm() has
 * dropped it (and uncharged it from the memory cgroup). */
static __always_inline int task_has_mm(const void *task)
{
#ifdef TAPIO_TASK_MM_OFFSET
    return read_ptr(task, TAPIO_TASK_MM_OFFSET) != NULL;
#else
    return 0;
#endif
}

/* What an OOM kill says about its victim, read from the victim's task. with_memory: its memory is still
 * charged, so the cgroup's usage and the victim's RSS are what they were at the kill. */
static __always_inline void read_victim(const void *victim, const struct kernel_layout *layout,
                                        struct container_record *rec, int with_memory)
{
    read_process_name(victim, rec);
#if defined(TAPIO_TASK_SIGNAL_OFFSET) && defined(TAPIO_SIGNAL_OOM_SCORE_ADJ_OFFSET)
    const void *signal = read_ptr(victim, TAPIO_TASK_SIGNAL_OFFSET);
    if (signal && TAPIO_READ_AT(rec->oom_score_adj, signal, TAPIO_SIGNAL_OOM_SCORE_ADJ_OFFSET) == 0)
        rec->flags |= FLAG_OOM_SCORE_ADJ;
#endif
    read_cgroup(victim, layout, rec);
    read_memory(victim, layout, rec, with_memory);
    if (with_memory)
        read_rss(victim, layout, rec);
}

/* Who last had the kernel kill (a SIGKILL sent as SEND_SIG_PRIV) or OOM-mark each thread, by the thread's id.
 * The OOM killer sends its victim SIGKILL just before it marks it, from the task whose allocation invoked it:
 * whichever of the mark and the victim's exit comes first finds the victim's task or its trigger here. */
struct killer {
    u64 victim;                  /* the killed thread's struct task_struct *; 0 when only its id is known */
    u64 sender;                  /* pid_tgid of the killer */
    u64 timestamp_ns;
    char comm[16];
    u8 oom_killer;               /* the kill was the OOM killer's */
};
BPF_TABLE("lru_hash", u32, struct killer, killers, 1024);

static __always_inline void note_killer(u32 tid, const void *victim, u8 oom_killer)
{
    struct killer killer = {};
    killer.victim = (u64)victim;
    killer.sender = bpf_get_current_pid_tgid();
    killer.timestamp_ns = bpf_ktime_get_ns();
    killer.oom_killer = oom_killer;
    bpf_get_current_comm(killer.comm, sizeof(killer.comm));
    killers.update(&tid, &killer);
}

/* Whether the signal being sent comes from the OOM killer: every OOM kill (global, memory cgroup, sysrq) runs
 * in out_of_memory(), and nothing else there sends a signal. */
static __always_inline int sent_by_oom_killer(void *ctx, const struct kernel_layout *layout)
{
    u64 ips[KILLER_STACK_DEPTH] = {};
    if (!layout->oom_killer_start || bpf_get_stack(ctx, ips, sizeof(ips), 0) <= 0)
        return 0;
#pragma unroll
    for (int i = 0; i < KILLER_STACK_DEPTH; i++) {
        if (ips[i] >= layout->oom_killer_start && ips[i] < layout->oom_killer_end)
            return 1;
    }
    return 0;
}

#ifdef TAPIO_SIGNAL_GENERATE_TASK
RAW_TRACEPOINT_PROBE(signal_generate)
{
    /* TP_PROTO(int sig, struct kernel_siginfo *info, struct task_struct *task, int group, int result) */
    if ((int)ctx->args[0] != SIGKILL || ctx->args[1] != SEND_SIG_PRIV)
        return 0;
    const struct kernel_layout *layout = configured_layout();
    if (!layout)
        return 0;
#ifdef TAPIO_TASK_PID_OFFSET
    const void *target = (const void *)ctx->args[2];
    u32 tid = 0;
    if (TAPIO_READ_AT(tid, target, TAPIO_TASK_PID_OFFSET) == 0)
        note_killer(tid, target, sent_by_oom_killer(ctx, layout));
#endif
    return 0;
}
#endif

/* The OOM killer's kill or mark noted for the exiting thread, or else its leader, since the process started
 * (an older entry is about an earlier owner of the id); *key says which. */
static __always_inline struct killer *oom_killer_of(u32 tgid, u32 tid, u64 start_time, u32 *key)
{
    *key = tid;
    struct killer *killer = killers.lookup(key);
    if (!killer || !killer->oom_killer || killer->timestamp_ns < start_time) {
        *key = tgid;
        killer = killers.lookup(key);
    }
    if (!killer || !killer->oom_killer || killer->timestamp_ns < start_time)
        return NULL;
    return killer;
}

/* The trigger of a victim whose exit reports it: the task that ran the OOM killer against it. */
static __always_inline void take_trigger(struct container_record *rec, u32 tgid, u32 tid, u64 start_time)
{
    u32 key = 0;
    struct killer *killer = oom_killer_of(tgid, tid, start_time, &key);
    if (!killer)
        return;
    rec->trigger_pid = killer->sender >> 32;
    __builtin_memcpy(rec->trigger_comm, killer->comm, sizeof(rec->trigger_comm));
    rec->flags |= FLAG_TRIGGER;
    killers.delete(&key);
}

/* Claims the victim for its one oom_kill: 0 when it was claimed already (another thread of the process was
 * marked, or its mark and its exit both came, the other first). */
static __always_inline int claim_victim(u32 tgid, u64 start_time)
{
    struct process_key key = {.tgid = tgid, .start_time = start_time};
    u8 one = 1;
    return oom_victims.insert(&key, &one) == 0;
}

/* A fresh oom_kill record for victim tgid/tid, if this claims it; else 0. */
static __always_inline struct container_record *oom_record(u32 tgid, u32 tid, u64 start_time)
{
    if (!claim_victim(tgid, start_time))
        return 0;
    struct container_record *rec = fresh_record(KIND_OOM_KILL);
    if (!rec)
        return 0;
    rec->task.pid = tgid;
    rec->task.tid = tid;
    return rec;
}

/* The victim's oom_kill at its mark, in the trigger's (the current task's) context, read from its task. */
static __always_inline void report_marked_victim(const void *victim, const struct kernel_layout *layout)
{
#if defined(TAPIO_TASK_TGID_OFFSET) && defined(TAPIO_TASK_PID_OFFSET)
    u32 tgid = 0, tid = 0;
    TAPIO_READ_AT(tgid, victim, TAPIO_TASK_TGID_OFFSET);
    TAPIO_READ_AT(tid, victim, TAPIO_TASK_PID_OFFSET);
    struct container_record *rec = oom_record(tgid, tid, process_start_time(victim));
    if (!rec)
        return;  /* claimed already: the killer noted for it may be what its exit reports */
    killers.delete(&tid);
    rec->trigger_pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(rec->trigger_comm, sizeof(rec->trigger_comm));
    rec->flags |= FLAG_TRIGGER;
    read_victim(victim, layout, rec, 1);
    tapio_submit(rec, sizeof(*rec));
#endif  /* else no victim is reported at its mark: each is reported from its exit */
}

#ifdef TAPIO_MARK_VICTIM_TASK
RAW_TRACEPOINT_PROBE(mark_victim)
{
    /* TP_PROTO(struct task_struct *task, uid_t uid) */
    const void *victim = (const void *)ctx->args[0];
    const struct kernel_layout *layout = configured_layout();
    if (layout && victim)
        report_marked_victim(victim, layout);
    return 0;
}
#else
/* Kernels before about 6.8 hand mark_victim the victim's pid, not its task (TP_PROTO(int pid)). The SIGKILL the
 * OOM killer sent it just before, from this same task, names its task; a victim marked without one (the kernel
 * also marks a process that is already dying) is reported from its exit, with the trigger noted here. */
TRACEPOINT_PROBE(oom, mark_victim)
{
    const struct kernel_layout *layout = configured_layout();
    if (!layout)
        return 0;
    u32 pid = args->pid;
    const void *victim = NULL;
    struct killer *killer = killers.lookup(&pid);
    if (killer && killer->sender == bpf_get_current_pid_tgid())
        victim = (const void *)killer->victim;
    if (victim && oom_marked_mm(victim))
        report_marked_victim(victim, layout);
    else
        note_killer(pid, NULL, 1);
    return 0;
}
#endif

/* Whether this exit is an OOM kill's: the kernel marked the process (signal_struct.oom_mm), or -- before the
 * mark, which from 6.16 the exit tracepoint can outrun: it runs before exit_mm(), which no longer waits for
 * the OOM killer to let go of the victim -- the OOM killer sent it its SIGKILL. */
static __always_inline int oom_killed(const void *task, u32 tgid, u32 tid, u32 status)
{
    if (oom_marked_mm(task))
        return 1;
    u32 key = 0;
    return (status & 0x7f) == SIGKILL && oom_killer_of(tgid, tid, process_start_time(task), &key) != NULL;
}

/* The exit of an OOM-killed process. Silent when its mark reported it; else (its mark is still to come,
 * came before the agent ran, or gave no task) its oom_kill comes from here, in its own context: the memory
 * facts only while its memory is still charged. */
static __always_inline void oom_victim_exit(const void *task, u32 tgid, u32 tid, const struct kernel_layout *layout)
{
    u64 start_time = process_start_time(task);
    struct container_record *rec = oom_record(tgid, tid, start_time);  /* a mark still to come stays silent */
    if (!rec) {
        struct process_key key = {.tgid = tgid, .start_time = start_time};
        oom_victims.delete(&key);  /* its mark reported it: nothing else will ask */
        return;
    }
    take_trigger(rec, tgid, tid, start_time);
    read_victim(task, layout, rec, task_has_mm(task));
    tapio_submit(rec, sizeof(*rec));
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
#ifdef TAPIO_EXIT_HAS_GROUP_DEAD
    if (!args->group_dead)
        return 0;  /* not the process's last thread */
#endif
    const void *task = (const void *)bpf_get_current_task();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 status = process_exit_status(task, tgid == (u32)pid_tgid);
    if (status == 0)
        return 0;
#ifdef TAPIO_TASK_FLAGS_OFFSET
    u32 task_flags = 0;
    if (TAPIO_READ_AT(task_flags, task, TAPIO_TASK_FLAGS_OFFSET) == 0 && (task_flags & TAPIO_PF_KTHREAD))
        return 0;  /* a kernel thread's return value (often -errno) is no process's exit status */
#endif
#ifndef TAPIO_EXIT_HAS_GROUP_DEAD
    if (!last_thread_first_claim(task, tgid))
        return 0;
#endif
    const struct kernel_layout *layout = configured_layout();
    int zero = 0;
    struct exit_filter *filter = exit_filter.lookup(&zero);
    if (!layout || !filter)
        return 0;
    if (oom_killed(task, tgid, (u32)pid_tgid, status)) {
        oom_victim_exit(task, tgid, (u32)pid_tgid, layout);
        return 0;  /* an OOM victim's exit is its oom_kill, never an abnormal exit besides */
    }
    u32 signal = status & 0x7f;
    if (signal ? !bit_is_set(filter->reported_signals, signal, 2)
               : bit_is_set(filter->ignored_exit_codes, (status >> 8) & 0xff, 4))
        return 0;
    struct container_record *rec = fresh_record(KIND_ABNORMAL_EXIT);
    if (!rec)
        return 0;
    u64 started = process_start_time(task);
    rec->runtime_ns = started && rec->timestamp_ns > started ? rec->timestamp_ns - started : 0;
    int main_process = namespace_init(task, layout);
    if (!signal && !main_process && started && rec->runtime_ns < filter->min_runtime_ns) {
        /* a short-lived helper's non-zero exit: counted for its cgroup, carried on the cgroup's next record */
        cgroup_node(task, layout, rec);
        u64 zero_count = 0;
        u64 *quiet = quiet_exits.lookup_or_try_init(&rec->task.cgroup_id, &zero_count);
        if (quiet)
            __sync_fetch_and_add(quiet, 1);
        count_exit(COUNT_QUIET_EXITS);
        return 0;
    }
    read_process_name(task, rec);
    if (ignored_process_names.lookup((struct comm_key *)rec->task.comm))
        return 0;
    rec->task.pid = tgid;
    rec->task.tid = (u32)pid_tgid;
    rec->exit_status = status;
    u64 parent_id = read_cgroup(task, layout, rec);
    struct limit_key key = {};
    if (main_process) {
        /* A crash loop restarts the container in a new cgroup: its pod's (the parent) and its name are the key. */
        rec->flags |= FLAG_MAIN_PROCESS;
        key.cgroup_id = parent_id;
        key.kind = LIMIT_CRASH_LOOP;
        __builtin_memcpy(key.comm, rec->task.comm, sizeof(key.comm));
        if (!exit_allowed(&key, rec->timestamp_ns, filter->crash_loop_ns, filter->crash_loop_ns,
                          &rec->crash_loop_exits))
            return 0;
    } else {
        key.cgroup_id = rec->task.cgroup_id;
        key.kind = signal ? LIMIT_SIGNALED : LIMIT_EXIT_CODE;
        if (!exit_allowed(&key, rec->timestamp_ns, filter->record_cost_ns, filter->record_burst_ns,
                          &rec->suppressed))
            return 0;
    }
    u64 *quiet = quiet_exits.lookup(&rec->task.cgroup_id);
    if (quiet && *quiet)
        rec->quiet_exits = tapio_take(quiet);
    tapio_submit(rec, sizeof(*rec));
    return 0;
}
