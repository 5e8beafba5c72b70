/* The batch gather, and copies out of memory maps that survive the file shrinking under them.
 *
 * A source is either a memory map (read with a guarded copy) or an open file (read with ``pread``
 * straight into the batch buffer: no page of the file is mapped into the process, so a freshly
 * selected shard costs no page fault per page; a file that shrank is a short read, not SIGBUS).
 *
 * A file truncated while it is mapped makes every read of the lost pages raise SIGBUS, which kills
 * the process by default. Reads of maps here run inside a *guard*: a SIGBUS whose address lies in
 * the map being read, on the thread that reads it, jumps back to the guard's start and the copy
 * returns SHARDSTORE_FAULT (the caller names the file). Any other SIGBUS goes to whoever handled it
 * before (Python's faulthandler, say), or kills the process as if no handler had been installed.
 *
 * ``shardstore_install_bus_handler`` installs the handler (callers do so whenever they map a file or
 * set up a gather, which re-installs it if someone replaced it since). Only a pointer lives in
 * thread-local storage, initial-exec so that the handler never allocates it; the guard itself
 * (jump buffer, address range) is on the guarded call's stack. The handler runs with SA_NODEFER, so
 * SIGBUS is never blocked and the jump back need not restore the signal mask (no system call per
 * guarded copy). */
#ifndef SHARDSTORE_GATHER_H
#define SHARDSTORE_GATHER_H

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "stream_copy.h"

enum {
    SHARDSTORE_DONE = 0,       /* everything copied */
    SHARDSTORE_UNMAPPED = 1,   /* info: sample, field, source; the caller maps the source and calls again */
    SHARDSTORE_BAD_ROW = 2,    /* info: sample; it names a source or row out of range */
    SHARDSTORE_OUT_SHORT = 3,  /* info: sample, field; the destination buffer is too small for it */
    SHARDSTORE_SRC_SHORT = 4,  /* info: sample, field, source; the source map is too small for the row */
    SHARDSTORE_FAULT = 5,      /* info: sample, field, source, address; the source's file shrank (SIGBUS) */
    SHARDSTORE_SHORT_READ = 6, /* info: sample, field, source, file offset; the file ended before the row (it shrank) */
    SHARDSTORE_READ_ERROR = 7, /* info: sample, field, source, errno; reading the source's file failed */
};

struct shardstore_guard {
    sigjmp_buf jump;
    volatile uintptr_t lo, hi; /* the map being read: a SIGBUS in [lo, hi) is this guard's */
    volatile uintptr_t fault_address;
};

static __thread struct shardstore_guard *shardstore_guard_now __attribute__((tls_model("initial-exec")));
static struct sigaction shardstore_previous_bus;
static volatile sig_atomic_t shardstore_passing_on = 0;
static pthread_mutex_t shardstore_install_lock = PTHREAD_MUTEX_INITIALIZER;

/* Not ours: hand the signal to the handler that was there before, or die of it. */
static void shardstore_pass_on(int sig, siginfo_t *info, void *context) {
    struct sigaction previous = shardstore_previous_bus;
    struct sigaction dfl;
    if (!shardstore_passing_on) {
        /* Once only: a previous handler that re-installs us and raises again ends below. */
        shardstore_passing_on = 1;
        sigaction(sig, &previous, NULL);
        if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
        if (!(previous.sa_flags & SA_SIGINFO) && previous.sa_handler == SIG_IGN && info != NULL && info->si_code <= 0)
            return; /* an ignored kill(SIGBUS); a real fault cannot be ignored */
        if (!(previous.sa_flags & SA_SIGINFO) && previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
            previous.sa_handler(sig);
            return;
        }
    }
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    /* Delivered at once with the default action (SA_NODEFER); a real fault would also re-execute. */
    raise(sig);
}

static void shardstore_bus_handler(int sig, siginfo_t *info, void *context) {
    struct shardstore_guard *guard = shardstore_guard_now;
    if (guard != NULL && info != NULL && info->si_code > 0) { /* si_code > 0: sent by the kernel, a fault */
        uintptr_t at = (uintptr_t)info->si_addr;
        if (at >= guard->lo && at < guard->hi) {
            guard->fault_address = at;
            siglongjmp(guard->jump, 1);
        }
    }
    shardstore_pass_on(sig, info, context);
}

static int shardstore_is_ours(const struct sigaction *action) {
    return (action->sa_flags & SA_SIGINFO) && action->sa_sigaction == shardstore_bus_handler;
}

/* Install the handler unless it is in place; 0, or -1 when sigaction failed (reads are then unguarded). */
static int shardstore_install_bus_handler(void) {
    struct sigaction current, ours;
    int rc = 0;
    if (sigaction(SIGBUS, NULL, &current) != 0)
        return -1;
    if (shardstore_is_ours(&current))
        return 0;
    pthread_mutex_lock(&shardstore_install_lock);
    if (sigaction(SIGBUS, NULL, &current) != 0) {
        rc = -1;
    } else if (!shardstore_is_ours(&current)) {
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = shardstore_bus_handler;
        ours.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&ours.sa_mask);
        shardstore_previous_bus = current; /* before ours is live: the handler may read it at once */
        rc = sigaction(SIGBUS, &ours, NULL) == 0 ? 0 : -1;
    }
    pthread_mutex_unlock(&shardstore_install_lock);
    return rc;
}

/* Copy ``n`` bytes of a map that starts at ``lo`` and spans ``span`` bytes; SHARDSTORE_FAULT (and
 * ``fault_address``) when the file shrank under it, else SHARDSTORE_DONE. */
static int shardstore_guarded_copy(void *dst, const void *src, size_t n, uintptr_t lo, size_t span,
                                   uintptr_t *fault_address) {
    struct shardstore_guard guard;
    guard.lo = lo;
    guard.hi = lo + span;
    guard.fault_address = 0;
    if (sigsetjmp(guard.jump, 0) != 0) {
        shardstore_guard_now = NULL;
        *fault_address = guard.fault_address;
        return SHARDSTORE_FAULT;
    }
    shardstore_guard_now = &guard;
    atomic_signal_fence(memory_order_seq_cst); /* the guard is armed before the first read */
    memcpy(dst, src, n);
    atomic_signal_fence(memory_order_seq_cst);
    shardstore_guard_now = NULL;
    return SHARDSTORE_DONE;
}

/* A streaming copy from a file map, prefetching across its 4 KiB pages (see stream_copy.h). */
static inline void shardstore_map_copy(unsigned char *d, const unsigned char *s, size_t n) {
    shardstore_stream_copy_pages(d, s, n, 1);
}

/* Read ``n`` bytes at ``offset`` of ``fd`` into ``dst``: SHARDSTORE_DONE, SHARDSTORE_SHORT_READ when the
 * file ends first (``*at``: the offset where it ended), or SHARDSTORE_READ_ERROR (``*at``: errno). */
static int shardstore_read_exact(int fd, unsigned char *dst, size_t n, int64_t offset, int64_t *at) {
    ssize_t got;
    while (n > 0) {
        got = pread(fd, dst, n, (off_t)offset);
        if (got > 0) {
            dst += got;
            n -= (size_t)got;
            offset += got;
        } else if (got == 0) {
            *at = offset;
            return SHARDSTORE_SHORT_READ;
        } else if (errno != EINTR) {
            *at = errno;
            return SHARDSTORE_READ_ERROR;
        }
    }
    return SHARDSTORE_DONE;
}

/* The batch gather (see ``gather_batches`` in _kernels.pyx for the layout of the arguments).
 * Every copy is checked against the sizes of its source and destination buffer first. Source ``j`` of
 * field ``f`` is the map at ``bases[f, j]`` when that is not 0, else the file ``fds[f, j]`` (when
 * ``fds`` is not NULL and it is >= 0) whose row 0 starts at ``file_offsets[f, j]``. */
static int shardstore_gather(const uint64_t *bases, const uint64_t *source_bytes, int64_t num_fields,
                             int64_t num_sources, const int64_t *num_rows, const int64_t *row_bytes,
                             const int64_t *source, const int64_t *rows, int64_t n, int64_t batch_size,
                             const uint64_t *out, const uint64_t *out_bytes, int64_t num_batches,
                             int64_t *info, const int64_t *fds, const int64_t *file_offsets) {
    struct shardstore_guard guard;
    /* What the copy under way reads; volatile, as they are read again after a jump back. */
    volatile int64_t at_sample = 0, at_field = 0, at_source = 0;
    int64_t i, end, f, j, r, batch, batch_end, k, at = 0;
    uint64_t rb, length, dst_offset, src_offset;
    unsigned char *dst;
    int status = SHARDSTORE_DONE;

    guard.lo = guard.hi = 0;
    guard.fault_address = 0;
    if (sigsetjmp(guard.jump, 0) != 0) {
        shardstore_guard_now = NULL;
        shardstore_stream_fence();
        info[0] = at_sample;
        info[1] = at_field;
        info[2] = at_source;
        info[3] = (int64_t)guard.fault_address;
        return SHARDSTORE_FAULT;
    }
    shardstore_guard_now = &guard;
    for (i = 0; i < n && status == SHARDSTORE_DONE; i = end) {
        j = source[i];
        r = rows[i];
        info[0] = i;
        if (j < 0 || j >= num_sources || r < 0 || r >= num_rows[j]) {
            status = SHARDSTORE_BAD_ROW;
            break;
        }
        /* The run: consecutive rows of source j, not past the batch or the source. */
        batch = i / batch_size;
        batch_end = (batch + 1) * batch_size;
        if (batch_end > n)
            batch_end = n;
        end = i + 1;
        while (end < batch_end && source[end] == j && rows[end] == r + (end - i) && rows[end] < num_rows[j])
            end += 1;
        for (f = 0; f < num_fields; f++) {
            info[1] = f;
            info[2] = j;
            rb = (uint64_t)row_bytes[f];
            length = (uint64_t)(end - i) * rb;
            dst_offset = (uint64_t)(i - batch * batch_size) * rb;
            src_offset = (uint64_t)r * rb;
            k = f * num_sources + j;
            if (bases[k] == 0 && (fds == NULL || fds[k] < 0)) {
                status = SHARDSTORE_UNMAPPED;
                break;
            }
            if (src_offset + length > source_bytes[f * num_sources + j]) {
                status = SHARDSTORE_SRC_SHORT;
                break;
            }
            if (batch >= num_batches || dst_offset + length > out_bytes[batch * num_fields + f]) {
                status = SHARDSTORE_OUT_SHORT;
                break;
            }
        }
        if (status != SHARDSTORE_DONE)
            break;
        for (f = 0; f < num_fields; f++) {
            k = f * num_sources + j;
            rb = (uint64_t)row_bytes[f];
            dst = (unsigned char *)(uintptr_t)(out[batch * num_fields + f] + (uint64_t)(i - batch * batch_size) * rb);
            length = (uint64_t)(end - i) * rb;
            if (bases[k] == 0) { /* an open file: one pread per run, no map, no guard needed */
                status = shardstore_read_exact((int)fds[k], dst, (size_t)length, file_offsets[k] + r * (int64_t)rb, &at);
                if (status != SHARDSTORE_DONE) {
                    info[1] = f;
                    info[2] = j;
                    info[3] = at;
                    break;
                }
                continue;
            }
            at_sample = i;
            at_field = f;
            at_source = j;
            guard.lo = (uintptr_t)bases[k];
            guard.hi = guard.lo + (uintptr_t)source_bytes[k];
            atomic_signal_fence(memory_order_seq_cst); /* the guard names this map before it is read */
            shardstore_map_copy(dst, (const unsigned char *)(uintptr_t)(bases[k] + (uint64_t)r * rb), (size_t)length);
            atomic_signal_fence(memory_order_seq_cst);
        }
    }
    shardstore_guard_now = NULL;
    shardstore_stream_fence(); /* the streamed stores are visible to other threads from here on */
    return status;
}

#endif
