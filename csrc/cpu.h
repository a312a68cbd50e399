/* cpu.h -- runtime CPU feature detection for the kernels' dispatch.
 *
 * The build never uses -march=native: every SIMD kernel carries its own
 * __attribute__((target(...))) and is only called after ic_cpu_has() said yes,
 * so one binary runs on any x86-64 (and builds scalar-only elsewhere).
 * AVX-512 and AVX2 need both the CPUID bits and the OS having enabled the
 * register state (XGETBV). AMX is deliberately never used.
 */
#ifndef IC_CPU_H
#define IC_CPU_H

#if defined(__x86_64__) || defined(_M_X64)
#define IC_X86 1
#include <cpuid.h>
#endif

typedef enum { IC_ISA_SCALAR = 0, IC_ISA_AVX2 = 1, IC_ISA_AVX512 = 2, IC_ISA_COUNT = 3 } ic_isa;

#ifdef IC_X86
static inline unsigned long long ic_xgetbv0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

/* 1 when this CPU (and OS) can run kernels of the given ISA (asks CPUID). */
static inline int ic_cpu_detect(ic_isa isa) {
    if (isa == IC_ISA_SCALAR)
        return 1;
#ifdef IC_X86
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx || !fma)
        return 0;
    unsigned long long xcr0 = ic_xgetbv0();
    if ((xcr0 & 0x6) != 0x6) /* XMM and YMM state */
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    int avx2 = (b >> 5) & 1;
    if (isa == IC_ISA_AVX2)
        return avx2;
    if (isa == IC_ISA_AVX512) {
        int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
        return avx2 && f && dq && bw && vl && (xcr0 & 0xE6) == 0xE6; /* opmask, ZMM state */
    }
#endif
    return 0;
}

/* 1 when AVX-512 VNNI (vpdpbusd) is usable: the int8 scan's fast path (asks CPUID). */
static inline int ic_cpu_detect_vnni512(void) {
#ifdef IC_X86
    unsigned int a, b, c, d;
    if (!ic_cpu_detect(IC_ISA_AVX512) || !__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (c >> 11) & 1;
#else
    return 0;
#endif
}

/* CPUID traps to the hypervisor in a VM (measured ~20 us per ISA check on the bench
 * box, more than a whole gather), so the answers are taken once and cached: bit i =
 * ISA i, bit 8 = VNNI, bit 31 = filled. A write-once fact of the CPU; concurrent
 * first calls store the same value (atomics: no data race). */
static inline unsigned ic_cpu_bits(void) {
    static unsigned cached;
    unsigned b = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (!b) {
        b = 1u << 31;
        for (int i = 0; i < IC_ISA_COUNT; i++)
            b |= (unsigned)ic_cpu_detect((ic_isa)i) << i;
        b |= (unsigned)ic_cpu_detect_vnni512() << 8;
        __atomic_store_n(&cached, b, __ATOMIC_RELAXED);
    }
    return b;
}

static inline int ic_cpu_has(ic_isa isa) { return (ic_cpu_bits() >> isa) & 1; }
static inline int ic_cpu_has_vnni512(void) { return (ic_cpu_bits() >> 8) & 1; }

#endif /* IC_CPU_H */
