/* The native CPU library of specexec-rt (libspecexec_cpu.so), called through ctypes by
 * kernels/cpu_native.py and the op packages of kernels/. This file is the library: the ISA
 * levels and their run-time detection, the error codes and the ABI version; each op's code is a
 * header it includes, in dependency order:
 *
 *   cpu_common.h  helpers every op shares: fp16 loads, the int8 activation quantization, the
 *                 thread split, exp in fixed operations, the fused prologue (RMSNorm, SiLU * up)
 *   int4_cpu.h    4-bit weight-only matmul (kernels/int4), with int4_cpu_avx512.h
 *   q8_cpu.h      Q8_0 weight matmul for LM heads (kernels/q8)
 *   f32_cpu.h     float32 matmul of a few rows (kernels/dense)
 *   attn_cpu.h    RoPE + KV-cache write (float32/float16/bfloat16/int8) + tree-masked attention
 *                 (kernels/attention)
 *   layers_cpu.h  every transformer layer of a pass in one call (kernels/layers)
 *   argmax_cpu.h  row-wise argmax (kernels/argmax)
 *
 * Build with -ffp-contract=off: every op's float arithmetic is written out in a fixed order so
 * that every ISA path gives the same bits, and the compiler must add no fused operations.
 * Threads: OpenMP when the compiler has it (sxc_has_openmp), else one.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SXC_X86 1
#include <immintrin.h>
#else
#define SXC_X86 0
#endif

#if SXC_X86 && defined(SXC_EMULATE_AVX512)
/* Test builds only (tests/test_int4_cpu.py, built with -mavx2 -mfma -mf16c): the AVX-512 code
 * paths run on an AVX2 CPU, their intrinsics implemented by SIMDe, so their lane logic is
 * checked where no AVX-512 CPU is at hand. */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#undef _mm512_madd_epi16 /* SIMDe 0.7.4 aliases it with the masked variant's four arguments */
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
static inline __m512 sxc_emulated_cvtepi32_ps(__m512i a) { /* missing from SIMDe 0.7.4 */
    int32_t i[16];
    float f[16];
    memcpy(i, &a, sizeof i);
    for (int j = 0; j < 16; j++) f[j] = (float)i[j];
    __m512 r;
    memcpy(&r, f, sizeof r);
    return r;
}
#define _mm512_cvtepi32_ps sxc_emulated_cvtepi32_ps
#endif

#define SXC_ABI_VERSION 9

/* ISA levels, lowest first (the Python side's names: scalar, avx2, avx512, avx512vnni). */
enum { SXC_SCALAR = 0, SXC_AVX2 = 1, SXC_AVX512 = 2, SXC_AVX512VNNI = 3 };

/* Error codes. */
enum { SXC_OK = 0, SXC_EISA = -1, SXC_ENOMEM = -2, SXC_EARG = -3 };


#define INLINE static inline __attribute__((always_inline))
/* An empty asm that "uses" a vector: keeps each row's int16 sum in a register, updated in
 * program order. Without it GCC computes all of a block's products first and spills them. */
#define KEEP_YMM(v) __asm__("" : "+x"(v))
#ifdef SXC_EMULATE_AVX512
#define KEEP_ZMM(v) ((void)0)
#else
#define KEEP_ZMM(v) __asm__("" : "+v"(v))
#endif

int sxc_abi_version(void) { return SXC_ABI_VERSION; }

int sxc_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The best ISA level this CPU (and its OS) supports. */
int sxc_best_isa(void) {
#if SXC_X86
    __builtin_cpu_init();
#ifdef SXC_EMULATE_AVX512
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return SXC_AVX512VNNI;
#endif
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
        return __builtin_cpu_supports("avx512vnni") ? SXC_AVX512VNNI : SXC_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return SXC_AVX2;
#endif
    return SXC_SCALAR;
}

#if SXC_X86
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#include "cpu_common.h"
#include "int4_cpu.h"
#include "q8_cpu.h"
#include "f32_cpu.h"
#include "attn_cpu.h"
#include "layers_cpu.h"
#include "argmax_cpu.h"
