// Runs a CUDA-style kernel body on the CPU: one std::thread per lane, the 32 lanes of a warp in
// lockstep at every shuffle (std::barrier), the warps of a block together (a block barrier for
// gd_threadgroup_barrier, `static` arrays for threadgroup memory, NaN at each block's start),
// blocks one after another (run_grid: in the order GD_BLOCK_ORDER names, so that comparing
// orders finds a block that depends on another).
// Enough for the gated-delta bodies, whose shuffles are reached by all 32 lanes of a warp and
// whose barriers by every thread of a block (uniform control flow).
// Built with -fsanitize=thread (helpers.compile_emulated(sanitize="thread")), ThreadSanitizer
// reports every pair of accesses to one address, one a write, by two threads with no barrier
// between them: a missing gd_barrier, whatever order the threads happened to run in. A shuffle
// exchanges its values but orders no memory there, as on CUDA (__shfl_sync is no fence).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char* f, int l);
extern "C" void AnnotateIgnoreSyncEnd(const char* f, int l);
extern "C" void AnnotateIgnoreReadsBegin(const char* f, int l);
extern "C" void AnnotateIgnoreReadsEnd(const char* f, int l);
extern "C" void AnnotateIgnoreWritesBegin(const char* f, int l);
extern "C" void AnnotateIgnoreWritesEnd(const char* f, int l);
// A shuffle's own traffic (its slots, its lane barrier) neither races nor orders.
struct ShuffleUnseen {
  ShuffleUnseen() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~ShuffleUnseen() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
};
#else
struct ShuffleUnseen {};
#endif

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim;

struct float4 {
  float x, y, z, w;
};

// bfloat16 storage: round to nearest even from float, exact widening to float (as MLX's).
struct bf16 {
  uint16_t bits;
  bf16() = default;
  explicit bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = 0x7fc0;
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct Warp {
  std::barrier<> bar{32};
  float slots[32];
  float tile[256];  // at_frag_round's exchange of a 16 x 16 tile
};
thread_local Warp* tl_warp = nullptr;
thread_local std::barrier<>* tl_block = nullptr;

inline float gd_shuffle(float x, int lane) {
  const ShuffleUnseen unseen;
  Warp& w = *tl_warp;
  w.slots[threadIdx.x % 32] = x;  // block mode: thread t is lane t % 32 of warp t / 32
  w.bar.arrive_and_wait();
  const float r = w.slots[lane % 32];
  w.bar.arrive_and_wait();
  return r;
}

template <int W>
inline float gd_group_sum(float x) {
  for (int o = W / 2; o > 0; o /= 2) {
    x += gd_shuffle(x, int(threadIdx.x ^ unsigned(o)));
  }
  return x;
}

inline float4 gd_load_f4(const float* p) { return {p[0], p[1], p[2], p[3]}; }
inline void gd_store_f4(float* p, float x, float y, float z, float w) {
  p[0] = x;
  p[1] = y;
  p[2] = z;
  p[3] = w;
}
inline float gd_exp(float x) { return std::exp(x); }
inline float gd_log(float x) { return std::log(x); }
inline float gd_rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float gd_mul(float a, float b) { return a * b; }
#define gd_prefetch(p) ((void)0)
// One block runs at a time, so a function-scope static array is that block's shared memory.
#define gd_threadgroup static
inline void gd_threadgroup_barrier() { tl_block->arrive_and_wait(); }

// Threadgroup memory starts every block as NaN (all bits set): helpers.compile_emulated puts
// gd_tg_poison(x) after each GD_TG / GD_TG16 / gd_threadgroup array x. The first thread of a
// block to pass the declaration fills it; a read before any write then gives NaN, as stale data
// might on a GPU.
inline std::mutex gd_tg_mutex;
inline unsigned long gd_tg_block = 0;  // the block running (run_blocks, run_grid count them)
inline std::map<const void*, unsigned long> gd_tg_filled;
template <typename A>
inline void gd_tg_poison(A& x) {
  const std::lock_guard<std::mutex> lock(gd_tg_mutex);
  unsigned long& filled = gd_tg_filled[static_cast<const void*>(&x)];
  if (filled != gd_tg_block) {
    std::memset(static_cast<void*>(&x), 0xff, sizeof(x));
    filled = gd_tg_block;
  }
}
// The order run_grid runs its blocks in: GD_BLOCK_ORDER unset or "" (x-major, as before),
// "reverse", or "shuffle:SEED" (a fixed permutation of SEED). A GPU runs blocks in any order and
// side by side, so a block that reads what another writes (or two that write one address) gives
// a result that changes with the order; running one case in several orders and comparing the
// outputs bit for bit finds such a dependency, which one order alone cannot.
inline std::vector<unsigned> gd_block_order(unsigned n) {
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  const char* env = std::getenv("GD_BLOCK_ORDER");
  const std::string how = env ? env : "";
  if (how == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (how.rfind("shuffle:", 0) == 0) {
    std::mt19937 rng(static_cast<unsigned>(std::stoul(how.substr(8))));
    std::shuffle(order.begin(), order.end(), rng);
  } else if (!how.empty()) {
    std::fprintf(stderr, "GD_BLOCK_ORDER: reverse or shuffle:SEED, got %s\n", how.c_str());
    std::abort();
  }
  return order;
}

// Every block of a grid of `blocks` blocks of `warps` warps, 32 lanes each (blocks.z 0 or 1: a
// 2-D grid), in gd_block_order's order; the threads of one block run together, and each block's
// threadgroup arrays start as NaN (gd_tg_poison).
inline void run_grid(dim3 blocks, unsigned warps, const std::function<void()>& lane_fn) {
  blockDim = {32, warps, 1};
  const unsigned nz = blocks.z > 0 ? blocks.z : 1u;
  for (const unsigned i : gd_block_order(nz * blocks.x * blocks.y)) {
    // block i in x-major order within each z, as before the z axis
    const unsigned bz = i / (blocks.x * blocks.y), bx = i / blocks.y % blocks.x, by = i % blocks.y;
    ++gd_tg_block;
    std::unique_ptr<Warp[]> warp(new Warp[warps]);
    std::barrier<> block(32 * warps);
    std::vector<std::thread> lanes;
    for (unsigned wy = 0; wy < warps; ++wy)
      for (unsigned lane = 0; lane < 32; ++lane)
        lanes.emplace_back([&, lane, wy] {
          threadIdx = {lane, wy, 0};
          blockIdx = {bx, by, bz};
          tl_warp = &warp[wy];
          tl_block = &block;
          lane_fn();
        });
    for (auto& t : lanes) t.join();
  }
}

// Block mode, for kernels with threadgroup memory and threadgroup barriers (the chunk kernels):
// all threads of one block run at once and meet at gd_barrier(); blocks run one after another,
// so a function-local `static` array serves as the block's threadgroup memory. Threads
// 32 w .. 32 w + 31 form warp w for the shuffles (threads a multiple of 32).
#define GD_TG static
#define GD_TG_PTR
struct Block {
  std::barrier<> bar;
  // named barriers (CUDA bar.sync id, n: gd_pair_barrier), made by the first thread to reach one
  std::mutex named_mutex;
  std::map<int, std::unique_ptr<std::barrier<>>> named;
  explicit Block(std::ptrdiff_t n) : bar(n) {}
};
thread_local Block* tl_blk = nullptr;
inline void gd_barrier() { tl_blk->bar.arrive_and_wait(); }
// CUDA's bar.sync id, n (chunk_source.H3_PAIR_TILES): the n threads that name barrier id meet.
inline void gd_pair_barrier(int id, int n) {
  std::barrier<>* b;
  {
    const std::lock_guard<std::mutex> lock(tl_blk->named_mutex);
    auto& slot = tl_blk->named[id];
    if (!slot) slot = std::make_unique<std::barrier<>>(n);
    b = slot.get();
  }
  b->arrive_and_wait();
}
inline float4 gd_f4(float x, float y, float z, float w) { return {x, y, z, w}; }
// Staged tile copies as CUDA's (the pieces' type kept, cp.async groups): here the copy is done
// at once, so a missing wait shows only as a missing barrier would (another thread's copy not
// yet made).
#define GD_TG16 alignas(16) static
template <typename T>
using gd_staged = T;
template <int NT, int R, int CL, typename D, typename S>
inline void gd_copy_tile(D dst, int dld, S src, size_t sld, int rmax, int tid, int cmax = CL) {
  for (int e = tid; e < R * CL; e += NT) {
    const int r = e / CL < rmax ? e / CL : rmax;
    const int c = e % CL < cmax ? e % CL : cmax - 1;
    dst[(e / CL) * dld + e % CL] = src[r * sld + c];
  }
}
inline void gd_copy_commit() {}
template <int N>
inline void gd_copy_wait() {}

inline void run_blocks(dim3 blocks, unsigned threads, const std::function<void()>& thread_fn) {
  blockDim = {threads, 1, 1};
  for (unsigned bz = 0; bz < (blocks.z ? blocks.z : 1); ++bz)
  for (unsigned by = 0; by < blocks.y; ++by)
    for (unsigned bx = 0; bx < blocks.x; ++bx) {
      ++gd_tg_block;
      Block block(threads);
      std::vector<Warp> warps(threads / 32);
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          threadIdx = {t, 0, 0};
          blockIdx = {bx, by, bz};
          tl_blk = &block;
          tl_warp = &warps[t / 32];
          thread_fn();
        });
      for (auto& th : pool) th.join();
    }
}

// The chunk kernels' tile layer (chunk_launch._TILES, STATE_MMA_BODY): a warp's 16 x 16 fp32
// accumulator with CUDA's mma.m16n8k8 fragment layout (lane 4 g + t holds rows g, g + 8 and
// columns 2 t, 2 t + 1 of each 8-column half). Each lane computes its own elements from the
// operands in memory, rounding them to tf32 as the tensor cores see them: MP 1 rounds each
// operand (cvt.rna: to nearest, ties away from zero, 10-bit mantissa), MP 3 adds the three
// products of the high and low tf32 parts (hi hi + hi lo + lo hi). Each step of 8 products is
// summed in float and added to the accumulator.
struct gd_acc {
  float c[2][4];
};
inline float gd_tf32_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
inline void gd_acc_zero(gd_acc& x) {
  for (auto& h : x.c)
    for (float& e : h) e = 0.0f;
}
inline void gd_acc_scale(gd_acc& x, float s) {
  for (auto& h : x.c)
    for (float& e : h) e *= s;
}
template <typename P>
inline void gd_acc_load(gd_acc& x, P p, int ld) {
  const int g = int(threadIdx.x % 32) / 4, t = int(threadIdx.x % 4);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 4; ++e) x.c[h][e] = p[(g + 8 * (e >> 1)) * ld + 8 * h + 2 * t + (e & 1)];
}
template <typename E>
inline void gd_acc_store(gd_acc& x, E* p, int ld) {
  const int g = int(threadIdx.x % 32) / 4, t = int(threadIdx.x % 4);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 4; ++e)
      p[(g + 8 * (e >> 1)) * ld + 8 * h + 2 * t + (e & 1)] = static_cast<E>(x.c[h][e]);
}
template <int MP, bool TA, bool TB, typename PA, typename PB>
inline void gd_mma(gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  static_assert(MP == 1 || MP == 3, "MP: 1 (tf32) or 3 (3 x tf32)");
  const int g = int(threadIdx.x % 32) / 4, t = int(threadIdx.x % 4);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 4; ++e) {
      const int i = g + 8 * (e >> 1), j = 8 * h + 2 * t + (e & 1);
      for (int k0 = 0; k0 < K; k0 += 8) {
        float s = 0.0f;
        for (int k = k0; k < k0 + 8; ++k) {
          const float a = TA ? A[k * lda + i] : A[i * lda + k];
          const float b = TB ? B[j * ldb + k] : B[k * ldb + j];
          const float ah = gd_tf32_round(a), bh = gd_tf32_round(b);
          if (MP == 3) {
            const float al = gd_tf32_round(a - ah), bl = gd_tf32_round(b - bh);
            s += al * bh + ah * bl + ah * bh;
          } else {
            s += ah * bh;
          }
        }
        x.c[h][e] += s;
      }
    }
}
// Operands staged in threadgroup memory: the same products (CUDA takes 16-bit ones through
// ldmatrix and mma.m16n8k16, whose bf16 / fp16 products are exact in fp32, as here).
template <int MP, bool TA, bool TB, typename PA, typename PB>
inline void gd_mma_staged(gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  gd_mma<MP, TA, TB>(x, A, lda, B, ldb, K);
}

// H3_BODY's products (chunk_source.H3_TILES): C_r += A B_r for r < R, B_r = B + r bo, each
// tile as gd_mma_staged (CUDA loads A's fragment once for the R tiles; the products are the same).
template <int MP, bool TA, bool TB, int R, typename PA, typename PB>
inline void gd_mma_rows(gd_acc* x, PA A, int lda, PB B, int ldb, int bo, int K) {
  for (int r = 0; r < R; ++r) gd_mma<MP, TA, TB>(x[r], A, lda, B + r * bo, ldb, K);
}
// H3_BODY's 16-bit tiles (chunk_source.H3_TILES): element (row, col) of the accumulator at
// p[row ld + col] (TR: p[col ld + row]), widened to float / rounded to E.
template <bool TR, typename E>
inline void gd_acc_load16(gd_acc& x, const E* p, int ld) {
  const int g = int(threadIdx.x % 32) / 4, t = int(threadIdx.x % 4);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 4; ++e) {
      const int i = g + 8 * (e >> 1), j = 8 * h + 2 * t + (e & 1);
      x.c[h][e] = static_cast<float>(TR ? p[j * ld + i] : p[i * ld + j]);
    }
}
template <bool TR, typename E>
inline void gd_acc_store16(const gd_acc& x, E* p, int ld) {
  const int g = int(threadIdx.x % 32) / 4, t = int(threadIdx.x % 4);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 4; ++e) {
      const int i = g + 8 * (e >> 1), j = 8 * h + 2 * t + (e & 1);
      (TR ? p[j * ld + i] : p[i * ld + j]) = static_cast<E>(x.c[h][e]);
    }
}
// One 16-byte copy to byte off past s (CUDA: a cp.async; here at once).
inline void gd_cp16(void* s, unsigned off, const void* g) {
  std::memcpy(static_cast<char*>(s) + off, g, 16);
}
// __syncwarp(): the 32 lanes of the thread's warp meet (block mode: threads 32 w .. 32 w + 31).
inline void __syncwarp() { tl_warp->bar.arrive_and_wait(); }

// The prefill attention kernel's row scaling (kernels/attention/prefill.py `at_acc_scale_rows`),
// as CUDA's: lane 4 g + t scales its rows g and g + 8 by dg[17 g], dg[17 (g + 8)].
inline void at_acc_scale_rows(gd_acc& x, const float* dg) {
  const int g = int(threadIdx.x % 32) / 4;
  for (int h = 0; h < 2; ++h) {
    x.c[h][0] *= dg[17 * g];
    x.c[h][1] *= dg[17 * g];
    x.c[h][2] *= dg[17 * (g + 8)];
    x.c[h][3] *= dg[17 * (g + 8)];
  }
}

// Version 2's tile copy (prefill.py `_FRAGS`): gd_copy_tile's.
template <int NT, int R, int CL, typename D, typename S>
inline void at_copy_tile(D dst, int dld, S src, size_t sld, int rmax, int tid) {
  gd_copy_tile<NT, R, CL>(dst, dld, src, sld, rmax, tid);
}
// Version 3's copy (prefill.py `_FRAGS` at_copy_rows), CUDA's indexing: every row in range
// (rmax >= R - 1) by each thread's 16-byte copies from its first row and column at constant
// strides, else gd_copy_tile's clamped copy.
template <int NT, int R, int CL, typename D, typename S>
inline void at_copy_rows(D dst, int dld, S src, size_t sld, int rmax, int tid) {
  constexpr int V = 16 / int(sizeof(*src));
  constexpr int CV = CL / V;
  constexpr int U = R * CV;
  constexpr int RPI = NT / CV;
  if (NT % CV != 0 || rmax < R - 1) {
    gd_copy_tile<NT, R, CL>(dst, dld, src, sld, rmax, tid);
    return;
  }
  const int r0 = tid / CV;
  const int c = (tid % CV) * V;
  for (int it = 0; it < (U + NT - 1) / NT; ++it) {
    if (U % NT != 0 && r0 + it * RPI >= R) break;
    std::memcpy(dst + (r0 + it * RPI) * dld + c, src + (r0 + it * RPI) * sld + c, 16);
  }
}
// Version 2's register operands (prefill.py `_FRAGS`): a lane's copy of the whole 16 x 16 A
// operand, the products as gd_mma's.
struct at_frag {
  float a[16 * 16];
};
template <typename P>
inline void at_frag_load(at_frag& f, P A, int lda) {
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.a[16 * i + k] = float(A[i * lda + k]);
}
template <bool TB, typename P>
inline void at_mma_frag(gd_acc& x, const at_frag& f, P B, int ldb) {
  gd_mma<1, false, TB>(x, static_cast<const float*>(f.a), 16, B, ldb, 16);
}

// Version 3's layout-aware register ops (prefill.py `_REGS`), CUDA's C-fragment layout: element
// e of a lane's accumulator, e < 4 in row g, e >= 4 in row g + 8 (lane 4 g + t), column
// 8 ((e >> 1) & 1) + 2 t + (e & 1); a row's 4 lanes differ in lane bits 0 and 1.
inline float& at_el(gd_acc& x, int e) { return x.c[(e >> 1) & 1][(e & 1) + 2 * (e >> 2)]; }
inline int at_row0(int lane) { return lane >> 2; }
inline int at_col(int e, int lane) { return 8 * ((e >> 1) & 1) + 2 * (lane & 3) + (e & 1); }
inline float at_fmax(float a, float b) { return std::fmax(a, b); }
inline float at_row_max(float x, int lane) {
  const float a = gd_shuffle(x, lane ^ 1);
  x = std::max(x, a);
  const float b = gd_shuffle(x, lane ^ 2);
  return std::max(x, b);
}
inline float at_row_sum(float x, int lane) {
  x += gd_shuffle(x, lane ^ 1);
  return x + gd_shuffle(x, lane ^ 2);
}
inline float at_exp2(float x) { return std::exp2(x); }
// x's elements rounded to OT in place and, as P's A operand, the whole warp's tile in f (each
// lane's copy): the lanes meet twice, as at a shuffle.
template <typename OT>
inline void at_frag_round(at_frag& f, gd_acc& x) {
  const int lane = int(threadIdx.x % 32);
  for (int e = 0; e < 8; ++e) at_el(x, e) = float(OT(at_el(x, e)));
  const ShuffleUnseen unseen;
  Warp& w = *tl_warp;
  for (int e = 0; e < 8; ++e) {
    w.tile[16 * (at_row0(lane) + 8 * (e >> 2)) + at_col(e, lane)] = at_el(x, e);
  }
  w.bar.arrive_and_wait();
  for (int i = 0; i < 256; ++i) f.a[i] = w.tile[i];
  w.bar.arrive_and_wait();
}
