// metal_emu.h — just enough of the Metal Shading Language to compile an `mx.fast.metal_kernel`
// body with g++ and run it on the CPU, for tests. Not a product feature.
//
// Execution model. Every thread of a threadgroup is a fiber (its own stack) on one OS thread;
// threadgroups run one after another. A fiber runs until it reaches a synchronisation point
// (a SIMD-group function, simdgroup_barrier, threadgroup_barrier) or returns. So:
//   * SIMD-group functions have real 32-lane semantics: no lane gets its result before every
//     live lane of its SIMD group has arrived with its operand (lanes of one SIMD group must
//     reach the same number of SIMD operations, else the launch fails with a message);
//   * threadgroup_barrier releases only when every live thread of the threadgroup waits at one
//     (a thread that returned early while others wait is reported as an error);
//   * between sync points threads run one after another, never interleaved, so a missing
//     barrier shows up as stale threadgroup data and a wrong result rather than luck.
// simd_sum / simd_max / simd_min reduce with the ascending xor butterfly (1, 2, 4, 8, 16), which
// is how current Apple GPUs lower them, so sums are bit-identical to a hand-written butterfly.
// Outputs not given an init value start as all-one bytes (NaN) so unwritten elements show.
//
// Limits (by design; our kernels keep within them): `threadgroup` may only qualify array/variable
// declarations in the kernel body (it becomes `static`); vector types are the few below;
// divergent SIMD operations (a SIMD function called by only some lanes) are an error.
#pragma once

#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>
#include <ucontext.h>

// ---- scalar types -------------------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef _Float16 float16_t;

struct bfloat16_t {  // MLX's bfloat16_t: storage bf16, arithmetic in float, round-to-nearest-even
  uint16_t bits;
  bfloat16_t() = default;
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  bfloat16_t(float f) : bits(round(f)) {}
  bfloat16_t(double f) : bits(round(float(f))) {}
  bfloat16_t(int i) : bits(round(float(i))) {}
  bfloat16_t(_Float16 h) : bits(round(float(h))) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
#define MLX_EMU_BF16_OP(op)                                                                  \
  inline bfloat16_t operator op(bfloat16_t a, bfloat16_t b) { return float(a) op float(b); } \
  inline float operator op(bfloat16_t a, float b) { return float(a) op b; }                  \
  inline float operator op(float a, bfloat16_t b) { return a op float(b); }
MLX_EMU_BF16_OP(+)
MLX_EMU_BF16_OP(-)
MLX_EMU_BF16_OP(*)
MLX_EMU_BF16_OP(/)
#undef MLX_EMU_BF16_OP

// ---- vector types (the few kernels use) ------------------------------------------------------
template <typename T>
struct vec2 { T x, y; };
template <typename T>
struct vec3 { T x, y, z; };
template <typename T>
struct vec4 { T x, y, z, w; };
typedef vec2<uint> uint2;
typedef vec3<uint> uint3;
typedef vec2<int> int2;
typedef vec3<int> int3;
typedef vec2<float> float2;
typedef vec4<float> float4;

// ---- metal:: math ---------------------------------------------------------------------------
namespace metal {
#define MLX_EMU_UNARY(name, impl) \
  inline float name(float x) { return impl(x); }
MLX_EMU_UNARY(exp, std::exp)
MLX_EMU_UNARY(exp2, std::exp2)
MLX_EMU_UNARY(log, std::log)
MLX_EMU_UNARY(log2, std::log2)
MLX_EMU_UNARY(log1p, std::log1p)
MLX_EMU_UNARY(sqrt, std::sqrt)
MLX_EMU_UNARY(abs, std::fabs)
MLX_EMU_UNARY(fabs, std::fabs)
MLX_EMU_UNARY(tanh, std::tanh)
MLX_EMU_UNARY(sin, std::sin)
MLX_EMU_UNARY(cos, std::cos)
MLX_EMU_UNARY(floor, std::floor)
MLX_EMU_UNARY(ceil, std::ceil)
MLX_EMU_UNARY(round, std::round)
#undef MLX_EMU_UNARY
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float pow(float a, float b) { return std::pow(a, b); }
template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T>
inline T select(T a, T b, bool c) { return c ? b : a; }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
namespace precise { using metal::exp; using metal::log; using metal::sqrt; using metal::rsqrt; using metal::tanh; }
namespace fast { using metal::exp; using metal::log; using metal::sqrt; using metal::rsqrt; using metal::tanh; }

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
}  // namespace metal

// ---- the fiber scheduler ---------------------------------------------------------------------
namespace metal_emu {

enum Wait { RUNNABLE, AT_SIMD, AT_BARRIER, DONE };

struct ThreadIds {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup;
};

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  bool started = false;
  Wait wait = RUNNABLE;
  long simd_ops = 0;  // SIMD operations reached so far, and the source line of the current one:
  int simd_site = 0;  // lanes of a SIMD group must agree on both (no divergent SIMD calls)
  ThreadIds ids;
};

constexpr int kLanes = 32;
constexpr int kSlotBytes = 16;

struct SimdGroup {
  alignas(16) unsigned char slot[2][kLanes][kSlotBytes];  // operands, double-buffered by op parity
  alignas(16) unsigned char result[2][kLanes][kSlotBytes];  // reductions, computed once per op
  uint32_t arrived[2];
  bool reduced[2];
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> simdgroups;
  std::vector<char> stacks;
  size_t stack_bytes = 128 * 1024;
  jmp_buf home;
  int current = -1;
  int pending_site = 0;  // source line of the SIMD call being made (set by the macros below)
  std::string error;
  std::function<void(const ThreadIds&)> body;
};

inline thread_local Scheduler* active = nullptr;

inline void fiber_main() {
  Scheduler& s = *active;
  s.body(s.fibers[s.current].ids);
  s.fibers[s.current].wait = DONE;
  _longjmp(s.home, 1);
}

inline void yield(Wait why) {
  Scheduler& s = *active;
  Fiber& f = s.fibers[s.current];
  f.wait = why;
  if (!_setjmp(f.resume)) _longjmp(s.home, 1);
}

inline void fail(const std::string& msg) {
  if (active->error.empty()) active->error = msg;
}

// Run one threadgroup to completion; returns false on a sync error (message in s.error).
inline bool run_threadgroup(Scheduler& s, int n) {
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.started = false;
    f.wait = RUNNABLE;
    f.simd_ops = 0;
  }
  int n_simd = (n + kLanes - 1) / kLanes;
  for (;;) {
    for (int i = 0; i < n; ++i) {
      Fiber& f = s.fibers[i];
      if (f.wait != RUNNABLE) continue;
      s.current = i;
      if (!_setjmp(s.home)) {
        if (!f.started) {
          f.started = true;
          getcontext(&f.start);
          f.start.uc_stack.ss_sp = s.stacks.data() + size_t(i) * s.stack_bytes;
          f.start.uc_stack.ss_size = s.stack_bytes;
          f.start.uc_link = nullptr;
          makecontext(&f.start, fiber_main, 0);
          setcontext(&f.start);
        }
        _longjmp(f.resume, 1);
      }
      if (!s.error.empty()) return false;
    }
    // Everyone is blocked or done: release SIMD groups whose live lanes all arrived.
    bool released = false, all_done = true;
    int at_barrier = 0, live = 0;
    for (int g = 0; g < n_simd; ++g) {
      int lo = g * kLanes, hi = lo + kLanes < n ? lo + kLanes : n;
      int waiting = 0, alive = 0;
      long ops = -1;
      int site = -1;
      uint32_t mask = 0;
      for (int i = lo; i < hi; ++i) {
        Fiber& f = s.fibers[i];
        if (f.wait == DONE) continue;
        ++alive;
        if (f.wait == AT_SIMD) {
          ++waiting;
          mask |= 1u << (i - lo);
          if (ops >= 0 && (f.simd_ops != ops || f.simd_site != site)) {
            s.error = "divergent SIMD operation: lanes of SIMD group " + std::to_string(g) +
                      " wait at SIMD calls on lines " + std::to_string(site) + " and " + std::to_string(f.simd_site);
            return false;
          }
          ops = f.simd_ops;
          site = f.simd_site;
        }
        if (f.wait == AT_BARRIER) ++at_barrier;
      }
      live += alive;
      if (alive) all_done = false;
      if (alive && waiting == alive) {
        s.simdgroups[g].arrived[ops & 1] = mask;
        s.simdgroups[g].reduced[ops & 1] = false;
        for (int i = lo; i < hi; ++i)
          if (s.fibers[i].wait == AT_SIMD) s.fibers[i].wait = RUNNABLE;
        released = true;
      } else if (waiting) {
        s.error = "SIMD group " + std::to_string(g) +
                  ": some lanes wait at a SIMD operation while others wait at a threadgroup barrier";
        return false;
      }
    }
    if (all_done) return true;
    if (released) continue;
    if (at_barrier == live) {
      if (live != n) {
        s.error = "threadgroup_barrier not reached by all threads: " + std::to_string(n - live) +
                  " of " + std::to_string(n) + " returned before it";
        return false;
      }
      for (int i = 0; i < n; ++i) s.fibers[i].wait = RUNNABLE;
      continue;
    }
    s.error = "deadlock in the threadgroup";
    return false;
  }
}

inline uint ceil_div(uint a, uint b) { return (a + b - 1) / b; }

// Dispatch like MTLComputeCommandEncoder::dispatchThreads: `grid` counts threads; edge
// threadgroups are partial. Returns an empty string or the error.
inline std::string launch(const uint grid[3], const uint tg_in[3], std::function<void(const ThreadIds&)> body) {
  uint tg[3];
  for (int d = 0; d < 3; ++d) tg[d] = tg_in[d] < grid[d] ? tg_in[d] : grid[d];
  uint n_tg = tg[0] * tg[1] * tg[2];
  if (n_tg == 0 || n_tg > 1024) return "threadgroup size " + std::to_string(n_tg) + " not in [1, 1024]";
  Scheduler s;
  s.body = std::move(body);
  s.fibers.resize(n_tg);
  s.simdgroups.resize(ceil_div(n_tg, kLanes));
  s.stacks.resize(size_t(n_tg) * s.stack_bytes);
  Scheduler* outer = active;
  active = &s;
  uint groups[3] = {ceil_div(grid[0], tg[0]), ceil_div(grid[1], tg[1]), ceil_div(grid[2], tg[2])};
  for (uint gz = 0; gz < groups[2]; ++gz)
    for (uint gy = 0; gy < groups[1]; ++gy)
      for (uint gx = 0; gx < groups[0]; ++gx) {
        // Threads of this group inside the grid, in thread_index_in_threadgroup order.
        int n = 0;
        for (uint z = 0; z < tg[2]; ++z)
          for (uint y = 0; y < tg[1]; ++y)
            for (uint x = 0; x < tg[0]; ++x) {
              uint px = gx * tg[0] + x, py = gy * tg[1] + y, pz = gz * tg[2] + z;
              if (px >= grid[0] || py >= grid[1] || pz >= grid[2]) continue;
              ThreadIds& id = s.fibers[n].ids;
              uint linear = x + tg[0] * (y + tg[1] * z);
              id.thread_position_in_grid = {px, py, pz};
              id.thread_position_in_threadgroup = {x, y, z};
              id.threadgroup_position_in_grid = {gx, gy, gz};
              id.threads_per_threadgroup = {tg[0], tg[1], tg[2]};
              id.threadgroups_per_grid = {groups[0], groups[1], groups[2]};
              id.threads_per_grid = {grid[0], grid[1], grid[2]};
              id.thread_index_in_threadgroup = linear;
              id.thread_index_in_simdgroup = linear % kLanes;
              id.simdgroup_index_in_threadgroup = linear / kLanes;
              id.simdgroups_per_threadgroup = ceil_div(n_tg, kLanes);
              ++n;
            }
        if (!run_threadgroup(s, n)) {
          active = outer;
          return s.error;
        }
      }
  active = outer;
  return "";
}

// One SIMD operation: deposit this lane's operand, wait for the whole SIMD group, then read
// every arrived lane's operand. Returns (slot, arrived-lanes mask, this lane).
template <typename T>
inline const unsigned char* simd_exchange(T value, uint32_t& mask, int& lane) {
  static_assert(sizeof(T) <= kSlotBytes, "SIMD operand too large for the emulator");
  Scheduler& s = *active;
  Fiber& f = s.fibers[s.current];
  int parity = int(f.simd_ops & 1);
  lane = int(f.ids.thread_index_in_simdgroup);
  f.simd_site = s.pending_site;
  SimdGroup& g = s.simdgroups[f.ids.simdgroup_index_in_threadgroup];
  std::memcpy(g.slot[parity][lane], &value, sizeof(T));
  yield(AT_SIMD);
  ++f.simd_ops;
  mask = g.arrived[parity];
  return &g.slot[parity][0][0];
}

template <typename T>
inline T lane_value(const unsigned char* slot, int lane) {
  T v;
  std::memcpy(&v, slot + lane * kSlotBytes, sizeof(T));
  return v;
}

template <typename T, typename Op>
inline T butterfly(T x, Op op) {
  Scheduler& s = *active;
  Fiber& f = s.fibers[s.current];
  int parity = int(f.simd_ops & 1);
  uint32_t mask;
  int lane;
  const unsigned char* slot = simd_exchange(x, mask, lane);
  SimdGroup& g = s.simdgroups[f.ids.simdgroup_index_in_threadgroup];
  if (!g.reduced[parity]) {  // the first lane to resume reduces for the whole SIMD group
    T v[kLanes];
    for (int i = 0; i < kLanes; ++i) v[i] = lane_value<T>(slot, i);
    for (int m = 1; m < kLanes; m <<= 1) {
      T next[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        bool a = mask >> i & 1, b = mask >> (i ^ m) & 1;
        next[i] = a && b ? op(v[i], v[i ^ m]) : (a ? v[i] : v[i ^ m]);
      }
      std::memcpy(v, next, sizeof(v));
    }
    for (int i = 0; i < kLanes; ++i) std::memcpy(g.result[parity][i], &v[i], sizeof(T));
    g.reduced[parity] = true;
  }
  return lane_value<T>(&g.result[parity][0][0], lane);
}

}  // namespace metal_emu

// ---- Metal SIMD-group and barrier functions ------------------------------------------------
using metal::mem_flags;

template <typename T>
inline T simd_sum_impl(T x) { return metal_emu::butterfly(x, [](T a, T b) { return T(a + b); }); }
template <typename T>
inline T simd_max_impl(T x) { return metal_emu::butterfly(x, [](T a, T b) { return a > b ? a : b; }); }
template <typename T>
inline T simd_min_impl(T x) { return metal_emu::butterfly(x, [](T a, T b) { return a < b ? a : b; }); }

template <typename T>
inline T simd_shuffle_impl(T x, ushort src) {
  uint32_t mask;
  int lane;
  const unsigned char* slot = metal_emu::simd_exchange(x, mask, lane);
  return metal_emu::lane_value<T>(slot, src % metal_emu::kLanes);
}
template <typename T>
inline T simd_shuffle_xor_impl(T x, ushort m) { return simd_shuffle_impl(x, ushort(metal_emu::active->fibers[metal_emu::active->current].ids.thread_index_in_simdgroup ^ m)); }
template <typename T>
inline T simd_broadcast_impl(T x, ushort src) { return simd_shuffle_impl(x, src); }
template <typename T>
inline T simd_shuffle_down_impl(T x, ushort d) {  // lanes past the end keep their own value
  uint lane = metal_emu::active->fibers[metal_emu::active->current].ids.thread_index_in_simdgroup;
  T y = simd_shuffle_impl(x, ushort(lane + d < 32 ? lane + d : lane));
  return y;
}
template <typename T>
inline T simd_shuffle_up_impl(T x, ushort d) {
  uint lane = metal_emu::active->fibers[metal_emu::active->current].ids.thread_index_in_simdgroup;
  return simd_shuffle_impl(x, ushort(lane >= d ? lane - d : lane));
}
inline void simdgroup_barrier_impl(mem_flags) {
  uint32_t mask;
  int lane;
  metal_emu::simd_exchange(0, mask, lane);
}
inline void threadgroup_barrier(mem_flags) { metal_emu::yield(metal_emu::AT_BARRIER); }

// Each SIMD call records its source line first, so divergent calls are caught.
#define simd_sum(...) (metal_emu::active->pending_site = __LINE__, simd_sum_impl(__VA_ARGS__))
#define simd_max(...) (metal_emu::active->pending_site = __LINE__, simd_max_impl(__VA_ARGS__))
#define simd_min(...) (metal_emu::active->pending_site = __LINE__, simd_min_impl(__VA_ARGS__))
#define simd_shuffle_xor(...) (metal_emu::active->pending_site = __LINE__, simd_shuffle_xor_impl(__VA_ARGS__))
#define simd_shuffle_down(...) (metal_emu::active->pending_site = __LINE__, simd_shuffle_down_impl(__VA_ARGS__))
#define simd_shuffle_up(...) (metal_emu::active->pending_site = __LINE__, simd_shuffle_up_impl(__VA_ARGS__))
#define simd_broadcast(...) (metal_emu::active->pending_site = __LINE__, simd_broadcast_impl(__VA_ARGS__))
#define simd_shuffle(...) (metal_emu::active->pending_site = __LINE__, simd_shuffle_impl(__VA_ARGS__))
#define simdgroup_barrier(...) (metal_emu::active->pending_site = __LINE__, simdgroup_barrier_impl(__VA_ARGS__))

// ---- address spaces and attributes: C++ has one address space, so they vanish ---------------
#define device
#define constant
#define thread
#define threadgroup static
