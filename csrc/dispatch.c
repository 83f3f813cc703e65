/* Run-time choice of the ISA level and of the thread count.
 *
 * Portability: the extension is compiled for baseline x86-64 (no -march); only the functions in
 * isa_avx2.c / isa_avx512.c carry target attributes, and they are reached through the table chosen here
 * from __builtin_cpu_supports (which also checks that the OS saves the wide registers). On other
 * architectures only the scalar level is built. */
#include <stdio.h>
#include <stdlib.h>

#include "dispatch.h"

#if defined(__x86_64__) || defined(__i386__)
#define VX_X86 1
#endif

static const vx_isa *const levels[] = {
    &vx_isa_scalar,
#ifdef VX_X86
    &vx_isa_avx2, &vx_isa_avxvnni, &vx_isa_avx512, &vx_isa_avx512_bf16, &vx_isa_avx512_amx,
#endif
};

int vx_stream_l2 = 0;
static int best = -1;
static int current = -1;
static int threads = 0;

#ifdef VX_X86
#include <cpuid.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* CPUID bits GCC 12's __builtin_cpu_supports lacks or misses: F16C (leaf 1, ECX 29) and AVX-VNNI (leaf 7
 * sub-leaf 1, EAX 4); the OS's saving of the ymm state is covered by the "avx2" check. */
static int cpuid_bit(unsigned leaf, unsigned sub, int reg, int bit) {
    unsigned r[4];
    if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) return 0;
    return (int)(r[reg] >> bit & 1u);
}

/* AMX-TILE and AMX-INT8 (leaf 7, EDX 24 and 25), and the kernel's leave to use the tile data (Linux asks
 * each process to request it: ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; it fails where the OS does not
 * save the tiles) */
static int amx_usable(void) {
    static int usable = -1;
    if (usable < 0) {
        usable = cpuid_bit(7, 0, 3, 24) && cpuid_bit(7, 0, 3, 25);
#ifdef __linux__
        usable = usable && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
        usable = 0;
#endif
    }
    return usable;
}
#endif

int vx_isa_supported(int level) {
    if (level == VX_ISA_SCALAR) return 1;
#ifdef VX_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpuid_bit(1, 0, 2, 29);
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    switch (level) {
    case VX_ISA_AVX2: return avx2;
    case VX_ISA_AVXVNNI: return avx2 && cpuid_bit(7, 1, 0, 4);
    case VX_ISA_AVX512: return avx512;
    case VX_ISA_AVX512_BF16:
        return avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
    case VX_ISA_AVX512_AMX: return vx_isa_supported(VX_ISA_AVX512_BF16) && __builtin_cpu_supports("avx512vbmi") && amx_usable();
    }
#endif
    return 0;
}

int vx_isa_best(void) {
    if (best < 0) {
        best = VX_ISA_SCALAR;
        for (int level = VX_ISA_AVX512_AMX; level > VX_ISA_SCALAR && best == VX_ISA_SCALAR; level--)
            if (vx_isa_supported(level)) best = level;
    }
    return best;
}

int vx_set_isa(int level) {
#ifdef VX_X86
    unsigned r[4];
    vx_stream_l2 = __get_cpuid(0, &r[0], &r[1], &r[2], &r[3]) && r[1] == 0x756e6547u && r[3] == 0x49656e69u && r[2] == 0x6c65746eu;   /* "GenuineIntel" */
#endif
    current = VX_ISA_SCALAR;
    for (int l = level > vx_isa_best() ? vx_isa_best() : level; l > VX_ISA_SCALAR; l--)
        if (vx_isa_supported(l)) {
            current = l;
            break;
        }
    return current;
}

int vx_get_isa(void) { return current < 0 ? vx_set_isa(VX_ISA_AVX512_AMX) : current; }

const vx_isa *vx_active(void) { return levels[vx_get_isa()]; }

const char *vx_isa_name(int level) {
    static const char *const names[] = {"scalar", "avx2", "avxvnni", "avx512", "avx512bf16", "avx512amx"};
    return level >= 0 && level <= VX_ISA_AVX512_AMX ? names[level] : "unknown";
}

const char *vx_isa_detail(int level) {
    static const char *const detail[] = {
        "portable C, one float at a time",
        "AVX2 + FMA, 8 floats per vector, VPMADDUBSW int8 dot products for quantised weights",
        "AVX2 + FMA, 8 floats per vector, AVX-VNNI int8 dot products for quantised weights",
        "AVX-512F, 16 floats per vector, VPMADDUBSW int8 dot products (256-bit) for quantised weights",
        "AVX-512F, 16 floats per vector, bf16 dot products for bf16-precision matmuls, VNNI int8 dot products for quantised weights",
        "as avx512bf16, with AMX int8 tiles for q4 linears of 12 or more rows",
    };
    return level >= 0 && level <= VX_ISA_AVX512_AMX ? detail[level] : "unknown";
}

void vx_set_threads(int n) { threads = n > 0 ? n : 0; }

static __thread const int *caller_cap;   /* vx_follow_cap's cell for this thread, or NULL */

void vx_follow_cap(const int *cap) { caller_cap = cap; }

int vx_get_threads(void) {
    int n = threads > 0 ? threads : vx_cpus();
    const int *cap = caller_cap;
    if (cap) {
        const int c = __atomic_load_n(cap, __ATOMIC_RELAXED);
        if (c > 0 && c < n) n = c;
    }
    return n;
}

int vx_threads_for(double work) {
    int nt = vx_get_threads();
    if (work < 32768.0 || vx_in_region()) return 1;   /* (a nested region runs alone: planning for more misleads) */
    return nt;
}

void *vx_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
        fprintf(stderr, "voxtral_ref kernels: out of memory allocating %zu bytes\n", bytes);
        abort();
    }
    return p;
}

static int64_t kernel_ns[2];   /* by VX_TIME_* */

void vx_count_ns(int kind, int64_t ns) { __atomic_fetch_add(&kernel_ns[kind], ns, __ATOMIC_RELAXED); }

double vx_kernel_seconds(int kind) {
    return kind == VX_TIME_WEIGHTS || kind == VX_TIME_ATTENTION ? 1e-9 * (double)__atomic_load_n(&kernel_ns[kind], __ATOMIC_RELAXED) : 0.0;
}
