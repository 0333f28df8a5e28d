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

namespace jaxcascade {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kAccumulators = 24;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8, kAccumulators = 12;
constexpr const char* kIsa = "avx2";
#elif defined(__aarch64__)
constexpr int kLanes = 4, kAccumulators = 24;
constexpr const char* kIsa = "neon";
#else
constexpr int kLanes = 4, kAccumulators = 12;
constexpr const char* kIsa = "generic";
#endif
constexpr int kMaxVectors = 4;  // output-channel vectors per block

// One vector register of floats (GCC/Clang vector extensions), and the same for unaligned loads and stores.
typedef float vec __attribute__((vector_size(4 * kLanes)));
typedef float vecu __attribute__((vector_size(4 * kLanes), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vecu*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vecu*>(p) = v; }

// `vectors` vectors of channels (a multiple of kLanes) in equal groups of at most kMaxVectors: the group's
// width in vectors. 16-64 channels: AVX-512 1-4 vectors, one group; AVX2 2-8, NEON 4-16.
constexpr int group_vectors(int vectors) {
  const int groups = (vectors + kMaxVectors - 1) / kMaxVectors;
  return vectors / groups;
}

}  // namespace jaxcascade

#endif  // JAXCASCADE_KERNELS_SIMD_H_
