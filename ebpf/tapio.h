/* Shared helpers for Tapio observers' BPF programs (bcc).
 *
 * Each observer sends fixed-size records over one ring buffer named `events`
 * with tapio_submit(), which counts what the ring buffer refused in
 * `tapio_lost`, so losses are never silent. Those live in tapio_prelude.bpf.c,
 * which the agent puts at the top of every observer's program: bcc rewrites
 * map calls only in the main source, not in included headers. Kernel struct members are read at offsets the agent resolved from
 * BTF and passed as -D macros: never from the (older) kernel headers.
 */
#ifndef TAPIO_H
#define TAPIO_H

#include <uapi/linux/ptrace.h>

/* Mirrors TASK_DTYPE in tapio_core/observer.py: who did it. */
struct tapio_task {
    u32 pid;        /* thread group id: what userspace calls the pid */
    u32 tid;
    u64 cgroup_id;
    char comm[16];
};

static __always_inline void tapio_current_task(struct tapio_task *task)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    task->pid = pid_tgid >> 32;
    task->tid = (u32)pid_tgid;
    task->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&task->comm, sizeof(task->comm));
}

/* Reads a kernel struct member at a BTF-resolved byte offset. */
#define TAPIO_READ_AT(dst, base, offset)                                       \
    bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (offset))

#endif /* TAPIO_H */
