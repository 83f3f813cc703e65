/* vx_parallel: the kernels' threads. One team of worker threads for the whole process, shared by every
 * caller, one region at a time.
 *
 * Why not OpenMP: libgomp keeps a team per calling thread, and once the threads of all teams outnumber the
 * cores it cuts every worker's spin to ~100 iterations, so between two regions the workers sleep and each
 * region pays a futex wake-up. bench/bench_kernels.py's "threaded call" (an RMSNorm of 64 x 2048 on 2
 * threads): 29-31 us from any thread but the one that made the first team, 7.0-7.6 from that one; here
 * 6.4-6.9 from either. A live step makes ~400 regions: stepped from another thread (the engine's and the
 * server's sessions are, Engine.together) a q4 step took 67-81 ms against 50-65 from the main thread;
 * now 43-45 from either. Here every caller drives the same workers, which spin for VX_SPIN_NS after a
 * region before they sleep.
 *
 * A region: vx_parallel(nt, fn, ctx) runs fn(ctx, tid, nt) for tid = 0 .. nt-1, tid 0 on the caller,
 * and returns when all have returned. Inside one, vx_team_barrier(nt) waits for the region's nt threads.
 * A region started inside another (no kernel does) runs on its thread alone. */
#ifdef __linux__
#define _GNU_SOURCE   /* sched_getaffinity */
#endif
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef __linux__
#include <sched.h>
#endif

#include "dispatch.h"

/* after a region a worker spins this long for the next before it sleeps: a live step's kernels come
 * 5-100 us apart (Python between them), its steps 80 ms apart. Longer spins gained nothing measurable (a q4
 * step, 50 us to 1 ms) and kept a core from whatever runs next (bench_kernels' VNNI probe read 35 % low) */
enum { VX_SPIN_NS = 200000 };

static struct {
    pthread_mutex_t region;         /* held by the caller whose region runs */
    pthread_mutex_t m;              /* guards sleepers with wake */
    pthread_cond_t wake;
    int workers;                    /* started so far (tids 1 .. workers) */
    int sleepers;
    unsigned gen;                   /* even: a region published (a worker runs each new one); odd: being written */
    vx_task_fn fn;
    void *ctx;
    int nt;
    int pending;                    /* the region's workers still running */
    unsigned bar_count, bar_phase;  /* vx_team_barrier */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* a region other than `seen` is published */
static inline int region_after(unsigned seen, unsigned *g) {
    *g = __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE);
    return *g != seen && !(*g & 1);
}

typedef struct { int tid; unsigned gen; } worker_start;

static __thread int in_region;      /* a region started inside another runs on its thread alone */

static void *worker(void *arg) {
    const worker_start start = *(worker_start *)arg;
    free(arg);
    in_region = 1;
    unsigned seen = start.gen, g;    /* the last region published before it started */
    for (;;) {
        const int64_t t0 = vx_now_ns();
        for (int spins = 0; !region_after(seen, &g); spins++) {
            cpu_relax();
            if ((spins & 255) == 255 && vx_now_ns() - t0 > VX_SPIN_NS) {
                pthread_mutex_lock(&pool.m);
                pool.sleepers++;
                while (!region_after(seen, &g)) pthread_cond_wait(&pool.wake, &pool.m);
                pool.sleepers--;
                pthread_mutex_unlock(&pool.m);
            }
        }
        /* the region's arguments, then gen again: a worker outside the last region (tid >= its nt) may look
         * while the next is being written, and must not take half of it */
        vx_task_fn fn = __atomic_load_n(&pool.fn, __ATOMIC_RELAXED);
        void *ctx = __atomic_load_n(&pool.ctx, __ATOMIC_RELAXED);
        const int nt = __atomic_load_n(&pool.nt, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&pool.gen, __ATOMIC_RELAXED) != g) continue;
        seen = g;
        if (start.tid < nt) {
            fn(ctx, start.tid, nt);
            __atomic_fetch_sub(&pool.pending, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

/* a child of fork() has none of the workers: it starts its own */
static void reset_in_child(void) {
    pthread_mutex_init(&pool.region, NULL);
    pthread_mutex_init(&pool.m, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = pool.sleepers = 0;
}

/* workers 1 .. nt - 1, started on first use; -> the threads a region can have (fewer if the OS refuses) */
static int ensure_workers(int nt) {
    static int atfork;
    if (!atfork) atfork = 1, pthread_atfork(NULL, NULL, reset_in_child);
    while (pool.workers < nt - 1) {
        worker_start *arg = malloc(sizeof *arg);
        if (!arg) break;
        *arg = (worker_start){pool.workers + 1, pool.gen};
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int err = pthread_create(&t, &attr, worker, arg);
        pthread_attr_destroy(&attr);
        if (err) {
            free(arg);
            break;
        }
        pool.workers++;
    }
    return pool.workers + 1 < nt ? pool.workers + 1 : nt;
}

void vx_parallel(int nt, vx_task_fn fn, void *ctx) {
    if (nt <= 1 || in_region) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.region);
    in_region = 1;
    nt = ensure_workers(nt);
    const unsigned g = pool.gen;
    __atomic_store_n(&pool.gen, g + 1, __ATOMIC_RELAXED);     /* odd: being written */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&pool.fn, fn, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.ctx, ctx, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.nt, nt, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.pending, nt - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.gen, g + 2, __ATOMIC_SEQ_CST);      /* published */
    pthread_mutex_lock(&pool.m);        /* a worker checks gen under m before it sleeps: no wake-up lost */
    if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.m);
    fn(ctx, 0, nt);
    while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE)) cpu_relax();
    in_region = 0;
    pthread_mutex_unlock(&pool.region);
}

void vx_team_barrier(int nt) {
    if (nt <= 1) return;
    const unsigned phase = __atomic_load_n(&pool.bar_phase, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&pool.bar_count, 1, __ATOMIC_ACQ_REL) == (unsigned)nt) {
        __atomic_store_n(&pool.bar_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&pool.bar_phase, phase + 1, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&pool.bar_phase, __ATOMIC_ACQUIRE) == phase) cpu_relax();
    }
}

int vx_cpus(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
