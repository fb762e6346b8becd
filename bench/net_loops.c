/* Tight TCP loops that make the kernel do network work, for the network benchmark and storm test.
 *
 *   net_loops connect SECONDS          loopback connect/accept/close, one connection at a time
 *   net_loops bulk SECONDS             loopback bulk transfer: 64 KiB written, then read on the other end
 *   net_loops refuse HOST PORT COUNT   COUNT connects to a closed port (each answered by an RST)
 *   net_loops serve                    runs "connect SECONDS" / "bulk SECONDS" lines read from stdin
 *
 * Prints one JSON line: {"ops": N, "seconds": S, "cpu_seconds": C, "errors": E, "last_errno": X}
 * (bulk: ops are chunks of 64 KiB written and read; refuse: ops are connects refused, errors those
 * that ended otherwise). cpu_seconds is the loop's CPU time: on loopback the kernel's work, softirq
 * and BPF programs included, runs in its context, and unlike wall time it does not grow when other
 * processes compete for the CPU. Compiled at run time
 * (gcc -O2), so the loop costs the kernel's work and nothing of an interpreter's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)

static double clock_s(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_s(void)
{
    return clock_s(CLOCK_MONOTONIC);
}

static double cpu_s(void)
{
    return clock_s(CLOCK_PROCESS_CPUTIME_ID);
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static int last_errno;

static void report(long ops, double seconds, double cpu_seconds, long errors)
{
    printf("{\"ops\": %ld, \"seconds\": %.6f, \"cpu_seconds\": %.6f, \"errors\": %ld, \"last_errno\": %d}\n",
           ops, seconds, cpu_seconds, errors, last_errno);
}

/* A listening socket on 127.0.0.1 and an ephemeral port; fills addr with where it listens. */
static int listener(struct sockaddr_in *addr)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    memset(addr, 0, sizeof(*addr));
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(*addr);
    if (bind(fd, (struct sockaddr *)addr, len) < 0 || listen(fd, 128) < 0 ||
        getsockname(fd, (struct sockaddr *)addr, &len) < 0)
        die("listen");
    return fd;
}

static int connect_loop(double seconds)
{
    struct sockaddr_in addr;
    int lfd = listener(&addr);
    long ops = 0, errors = 0;
    double start = now_s(), end = start + seconds, t = start, cpu = cpu_s();
    while (t < end) {
        for (int i = 0; i < 64; i++) {  /* read the clock every 64 connections */
            int c = socket(AF_INET, SOCK_STREAM, 0);
            if (c < 0)
                die("socket");
            if (connect(c, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
                errors++;
                last_errno = errno;
                close(c);
                continue;
            }
            int a = accept(lfd, NULL, NULL);
            if (a < 0)
                die("accept");
            close(a);  /* the server closes first: its side keeps the TIME_WAIT, so client
                        * ports are free again at once (client-first caps the loop at the
                        * ephemeral range per tcp_tw_reuse delay) */
            close(c);
            ops++;
        }
        t = now_s();
    }
    report(ops, t - start, cpu_s() - cpu, errors);
    close(lfd);
    return 0;
}

static int bulk_loop(double seconds)
{
    /* Both ends in this process: write a chunk, read it back on the other end. Everything the
     * kernel does for it -- segmentation, loopback delivery, ACKs -- happens in this context. */
    struct sockaddr_in addr;
    int lfd = listener(&addr);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    int buffer = 4 * CHUNK;
    if (c < 0 || setsockopt(c, SOL_SOCKET, SO_SNDBUF, &buffer, sizeof(buffer)) < 0 ||
        connect(c, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("connect");
    int a = accept(lfd, NULL, NULL);
    if (a < 0 || setsockopt(a, SOL_SOCKET, SO_RCVBUF, &buffer, sizeof(buffer)) < 0)
        die("accept");
    static char chunk[CHUNK], sink[CHUNK];
    memset(chunk, 'x', sizeof(chunk));
    long ops = 0;
    double start = now_s(), end = start + seconds, t = start, cpu = cpu_s();
    while (t < end) {
        for (int i = 0; i < 16; i++) {
            if (write(c, chunk, sizeof(chunk)) != sizeof(chunk))
                die("write");
            for (size_t got = 0; got < sizeof(sink);) {
                ssize_t n = read(a, sink, sizeof(sink) - got);
                if (n <= 0)
                    die("read");
                got += n;
            }
            ops++;
        }
        t = now_s();
    }
    report(ops, t - start, cpu_s() - cpu, 0);
    close(c);
    close(a);
    close(lfd);
    return 0;
}

static int refuse_loop(const char *host, int port, long count)
{
    struct sockaddr_storage addr;
    socklen_t len;
    memset(&addr, 0, sizeof(addr));
    int family = strchr(host, ':') ? AF_INET6 : AF_INET;
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&addr;
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
            die("inet_pton");
        len = sizeof(*in);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&addr;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &in6->sin6_addr) != 1)
            die("inet_pton");
        len = sizeof(*in6);
    }
    long refused = 0, errors = 0;
    double start = now_s(), cpu = cpu_s();
    for (long i = 0; i < count; i++) {
        int c = socket(family, SOCK_STREAM, 0);
        if (c < 0)
            die("socket");
        if (connect(c, (struct sockaddr *)&addr, len) < 0 && errno == ECONNREFUSED) {
            refused++;
        } else {
            errors++;
            last_errno = errno;
        }
        close(c);
    }
    report(refused, now_s() - start, cpu_s() - cpu, errors);
    return 0;
}

/* Runs "connect SECONDS" / "bulk SECONDS" lines from stdin, one report each, until EOF: a benchmark
 * switching tracing on and off between short runs pays no process start per run. */
static int serve(void)
{
    char loop[16];
    double seconds;
    while (scanf("%15s %lf", loop, &seconds) == 2) {
        if (strcmp(loop, "connect") == 0)
            connect_loop(seconds);
        else if (strcmp(loop, "bulk") == 0)
            bulk_loop(seconds);
        else
            return 2;
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && strcmp(argv[1], "connect") == 0)
        return connect_loop(atof(argv[2]));
    if (argc == 3 && strcmp(argv[1], "bulk") == 0)
        return bulk_loop(atof(argv[2]));
    if (argc == 5 && strcmp(argv[1], "refuse") == 0)
        return refuse_loop(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc == 2 && strcmp(argv[1], "serve") == 0)
        return serve();
    fprintf(stderr, "usage: %s connect SECONDS | bulk SECONDS | refuse HOST PORT COUNT | serve\n", argv[0]);
    return 2;
}
