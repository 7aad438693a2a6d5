// Shared by the extension's primitives: one build that runs on every x86 CPU at its best.
// On x86-64 Linux with GCC or Clang, a function marked Q35_CLONES is compiled for AVX-512
// (x86-64-v4), for AVX2 + FMA (x86-64-v3) and for the baseline, and the loader picks the best
// the CPU has (ifunc). Elsewhere the mark is empty: one baseline build.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define Q35_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define Q35_CLONES
#endif
