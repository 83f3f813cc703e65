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
#include <sched.h>
#include <unistd.h>

#include "dispatch.h"

/* after a region a worker spins this long for the next before it sleeps: a live step's kernels come
 * 5-100 us apart (Python between them), its steps 80 ms apart. Longer spins gained nothing measurable (a q4
 * step, 50 us to 1 ms) and kept a core from whatever runs next (bench_kernels' VNNI probe read 35 % low) */
enum { VX_SPIN_NS = 200000 };

static struct {
    pthread_mutex_t region;         /* held by the caller whose region runs */
    pthread_mutex_t m;              /* guards the workers' sleeping flags and `slot` */
    int workers;                    /* started so far (tids 1 .. workers) */
    unsigned gen;                   /* even: a region published (a worker runs each new one); odd: being written */
    vx_task_fn fn;
    void *ctx;
    int nt;
    int pending;                    /* the region's workers still running */
    int64_t spin_ns;                /* VX_SPIN_NS, or 0 while regions have more threads than cores */
    unsigned bar_count, bar_phase;  /* vx_team_barrier */
    struct worker **slot;           /* [tid]: worker tid's, 1 .. workers */
    int slots;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

/* A worker sleeps on a condition of its own, so a region wakes only the workers it takes: after
 * set_threads(8) then (2), waking all 7 for each 2-thread region made an RMSNorm call 6.8 -> 23.6 us. */
struct worker {
    pthread_cond_t wake;
    int sleeping;                   /* guarded by pool.m */
    int tid;
    unsigned gen;                   /* the last region published before it started */
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* a wait inside or for a region: with more threads than cores, give the core to one that has work */
static inline void wait_a_moment(void) {
    if (__atomic_load_n(&pool.spin_ns, __ATOMIC_RELAXED)) cpu_relax();
    else sched_yield();
}

/* a region other than `seen` is published */
static inline int region_after(unsigned seen, unsigned *g) {
    *g = __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE);
    return *g != seen && !(*g & 1);
}

static __thread int in_region;      /* a region started inside another runs on its thread alone */

int vx_in_region(void) { return in_region; }

static void *worker(void *arg) {
    struct worker *me = arg;
    in_region = 1;
    unsigned seen = me->gen, g;
    int64_t t0 = vx_now_ns();        /* when it last ran a region: it spins VX_SPIN_NS from then */
    for (;;) {
        for (int spins = 0; !region_after(seen, &g); spins++) {
            cpu_relax();
            if ((spins & 255) == 255 && vx_now_ns() - t0 > __atomic_load_n(&pool.spin_ns, __ATOMIC_RELAXED)) {
                pthread_mutex_lock(&pool.m);
                me->sleeping = 1;
                while (!region_after(seen, &g)) pthread_cond_wait(&me->wake, &pool.m);
                me->sleeping = 0;
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
        if (me->tid < nt) {
            fn(ctx, me->tid, nt);
            __atomic_fetch_sub(&pool.pending, 1, __ATOMIC_RELEASE);
            t0 = vx_now_ns();
        }
    }
    return NULL;
}

/* a child of fork() has none of the workers: it starts its own */
static void reset_in_child(void) {
    pthread_mutex_init(&pool.region, NULL);
    pthread_mutex_init(&pool.m, NULL);
    pool.workers = pool.slots = 0;
    pool.slot = NULL;
}

/* workers 1 .. nt - 1, started on first use; -> the threads a region can have (fewer if the OS refuses) */
static int ensure_workers(int nt) {
    static int atfork;
    if (!atfork) atfork = 1, pthread_atfork(NULL, NULL, reset_in_child);
    while (pool.workers < nt - 1) {
        const int tid = pool.workers + 1;
        if (tid >= pool.slots) {
            struct worker **grown = realloc(pool.slot, sizeof *grown * (size_t)(2 * tid));
            if (!grown) break;
            pthread_mutex_lock(&pool.m);
            pool.slot = grown, pool.slots = 2 * tid;
            pthread_mutex_unlock(&pool.m);
        }
        struct worker *w = malloc(sizeof *w);
        if (!w) break;
        *w = (struct worker){.tid = tid, .gen = pool.gen};
        pthread_cond_init(&w->wake, NULL);
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int err = pthread_create(&t, &attr, worker, w);
        pthread_attr_destroy(&attr);
        if (err) {
            pthread_cond_destroy(&w->wake);
            free(w);
            break;
        }
        pthread_mutex_lock(&pool.m);
        pool.slot[tid] = w;
        pthread_mutex_unlock(&pool.m);
        pool.workers = tid;
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
    static int cpus;                    /* (read once: under the region lock) */
    cpus = cpus ? cpus : vx_cpus();
    /* more threads than cores (set_threads allows up to 4 a core): a spinning worker would hold a core that
     * another needs (an RMSNorm call on 8 threads of 2 cores: 1.1 ms), so they sleep at once, and the caller
     * and the barrier yield while they wait */
    __atomic_store_n(&pool.spin_ns, nt > cpus ? 0 : VX_SPIN_NS, __ATOMIC_RELAXED);
    const unsigned g = pool.gen;
    __atomic_store_n(&pool.gen, g + 1, __ATOMIC_RELAXED);     /* odd: being written */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&pool.fn, fn, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.ctx, ctx, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.nt, nt, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.pending, nt - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.gen, g + 2, __ATOMIC_SEQ_CST);      /* published */
    pthread_mutex_lock(&pool.m);        /* a worker checks gen under m before it sleeps: no wake-up lost */
    for (int t = 1; t < nt; t++)
        if (pool.slot[t]->sleeping) pthread_cond_signal(&pool.slot[t]->wake);
    pthread_mutex_unlock(&pool.m);
    fn(ctx, 0, nt);
    while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE)) wait_a_moment();
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
        while (__atomic_load_n(&pool.bar_phase, __ATOMIC_ACQUIRE) == phase) wait_a_moment();
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
