// The vector width and register budget of the instruction set this library is compiled for.
//
// The kernels keep blocks of outputs in vector registers (oneDNN's register blocking); how many fit is a
// property of the target, chosen here at compile time from the compiler's own macros (kernel_build.py sets
// the target's flags, e.g. -mno-avx512f for the AVX2 variant, -mcpu=native on ARM):
//   AVX-512:      32 registers of 16 floats -> 24 accumulators (+ up to 4 weights + a broadcast)
//   AVX2 + FMA:   16 registers of  8 floats -> 12 accumulators
//   NEON (ARM):   32 registers of  4 floats -> 24 accumulators
//   other (SSE):  16 registers of  4 floats -> 12 accumulators
// A block holds at most kMaxVectors vectors of output channels; wider outputs are done in channel groups,
// each a pass of its own over the same inputs (in L1 by then). A convolution's output is summed in the same
// order whatever the blocking; the dense head's final sum over hidden units goes lane by lane, so it
// rounds differently per width (float32 rounding, well inside the tests' tolerances).
#ifndef JAXCASCADE_KERNELS_SIMD_H_
#define JAXCASCADE_KERNELS_SIMD_H_

#include <cstdint>
#include <utility>

namespace jaxcascade {

// kBroadcastFirst: with 16 registers, the R inputs of a block are broadcast into registers first and each
// weight vector is loaded once for its R multiply-adds (oneDNN's AVX2 order); otherwise x86 compilers keep
// one broadcast and fold every weight load into its FMA, R loads per weight vector instead of one, and the
// loads, not the FMAs, bound the loop. With 32 registers the weights stay in registers either way.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kAccumulators = 24, kRegisters = 32;
constexpr bool kBroadcastFirst = false;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8, kAccumulators = 12, kRegisters = 16;
constexpr bool kBroadcastFirst = true;
constexpr const char* kIsa = "avx2";
#elif defined(__aarch64__)
constexpr int kLanes = 4, kAccumulators = 24, kRegisters = 32;
constexpr bool kBroadcastFirst = false;
constexpr const char* kIsa = "neon";
#else
constexpr int kLanes = 4, kAccumulators = 12, kRegisters = 16;
constexpr bool kBroadcastFirst = true;
constexpr const char* kIsa = "generic";
#endif
constexpr int kMaxVectors = 4;  // output-channel vectors per block
// Whether every output width (at most 64 channels) is one group: AVX-512's 4 vectors of 16. The loop over
// groups is then left out at compile time, and the AVX-512 code is what it was before there were groups.
constexpr bool kOneGroup = kLanes * kMaxVectors >= 64;

// One vector register of floats (GCC/Clang vector extensions), and the same for unaligned loads and stores.
typedef float vec __attribute__((vector_size(4 * kLanes)));
typedef float vecu __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vecu*>(p); }
template <int... Lane>
inline vec splat_lanes(float x, std::integer_sequence<int, Lane...>) {
  return vec{((void)Lane, x)...};
}
inline vec splat(float x) { return splat_lanes(x, std::make_integer_sequence<int, kLanes>{}); }  // a broadcast
// v in a register from here on: GCC would otherwise fold its load into each FMA that reads it (a load per use).
inline void in_register(vec& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(v));
#endif
}
inline void store(float* p, vec v) { *reinterpret_cast<vecu*>(p) = v; }

// Outputs per block for NV vectors of channels: NV x R accumulators, plus (kBroadcastFirst) R broadcasts and
// a weight vector, within the registers.
constexpr int block_outputs(int nv) {
  const int by_accumulators = kAccumulators / nv;
  const int by_registers = (kRegisters - 1) / (nv + 1);
  return kBroadcastFirst && by_registers < by_accumulators ? by_registers : by_accumulators;
}

// `vectors` vectors of channels (a multiple of kLanes) in equal groups of at most kMaxVectors: the group's
// width in vectors. 16-64 channels: AVX-512 1-4 vectors, one group; AVX2 2-8, NEON 4-16.
constexpr int group_vectors(int vectors) {
  const int groups = (vectors + kMaxVectors - 1) / kMaxVectors;
  return vectors / groups;
}

// acc[r][v] += xs[r * x_stride] * w[v * kLanes]: one tap and input channel for R outputs (kBroadcastFirst
// says in which order: the sums are the same).
template <int NV, int R>
inline void multiply_add(vec (&acc)[R][NV], const float* xs, int64_t x_stride, const float* w) {
  if constexpr (kBroadcastFirst) {
    vec s[R];
    for (int r = 0; r < R; ++r) s[r] = splat(xs[r * x_stride]);
    for (int v = 0; v < NV; ++v) {
      vec wv = load(w + kLanes * v);
      in_register(wv);
      for (int r = 0; r < R; ++r) acc[r][v] += s[r] * wv;
    }
  } else {
    vec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(w + kLanes * v);
    for (int r = 0; r < R; ++r) {
      const float s = xs[r * x_stride];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * wv[v];
    }
  }
}

}  // namespace jaxcascade

#endif  // JAXCASCADE_KERNELS_SIMD_H_
