// The dense kernel's head at every voxel: logits = relu(x . w1 + b1) . w2 + b2 (jaxcascade/cpu_kernel.py).
//
// In the dense form, the patch network's dense layers become 1^3 convolutions over every voxel of a
// block: XLA:CPU writes the 256-wide hidden layer of each voxel to memory and reads it back for the output
// layer (1.4 GB for a 1 mm brain), which made this product a third of the dense kernel's time. Here the
// hidden layer lives in registers, 4 vectors at a time: R voxels x 4 vectors of hidden units accumulate over the
// input channels, then meet the output layer's weights at once. Each voxel is computed by one thread in
// one order, whatever the thread count.
//
// Layouts: x (M, C), w1 (C, H), b1 (H), w2t (O, H) (the output layer transposed), b2 (O), logits (M, O);
// float32, C-contiguous; H a multiple of 64 (4 vectors on AVX-512) and O at most 4 (the Python side checks).
// JaxcascadeDenseHeadWhere also takes keep (M) and computes only the voxels it marks, R at a time
// (logits 0 elsewhere; ops/kept_outputs.py).

#include <algorithm>
#include <cstdint>

#include "parallel.h"

namespace jaxcascade {
namespace {

constexpr int kHiddenBlock = 4;  // 4 vectors of hidden units in registers at a time (64 on AVX-512)
constexpr int kMaxOutputs = 4;

struct Head {
  int64_t voxels, channels, hidden, outputs;
};

// Logits of R voxels (their indices).
template <int R>
void head_block(const Head& h, const float* x, const float* w1, const float* b1, const float* w2t,
                const float* b2, float* logits, const int64_t* voxel) {
  vec sums[R][kMaxOutputs];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < kMaxOutputs; ++o) sums[r][o] = vec{};
  for (int64_t unit = 0; unit < h.hidden; unit += kLanes * kHiddenBlock) {
    vec acc[R][kHiddenBlock];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kHiddenBlock; ++j) acc[r][j] = vec{};
    for (int64_t ci = 0; ci < h.channels; ++ci) {
      vec wv[kHiddenBlock];
      for (int j = 0; j < kHiddenBlock; ++j) wv[j] = load(w1 + ci * h.hidden + unit + kLanes * j);
      for (int r = 0; r < R; ++r) {
        const float s = x[voxel[r] * h.channels + ci];
        for (int j = 0; j < kHiddenBlock; ++j) acc[r][j] += s * wv[j];
      }
    }
    for (int j = 0; j < kHiddenBlock; ++j) {
      const vec bias = load(b1 + unit + kLanes * j);
      for (int r = 0; r < R; ++r) {
        const vec hidden = acc[r][j] + bias;
        acc[r][j] = hidden > 0 ? hidden : vec{};  // ReLU
      }
    }
    for (int o = 0; o < h.outputs; ++o) {
      for (int j = 0; j < kHiddenBlock; ++j) {
        const vec weight = load(w2t + o * h.hidden + unit + kLanes * j);
        for (int r = 0; r < R; ++r) sums[r][o] += acc[r][j] * weight;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < h.outputs; ++o) {
      float total = 0;
      for (int lane = 0; lane < kLanes; ++lane) total += sums[r][o][lane];
      logits[voxel[r] * h.outputs + o] = total + b2[o];
    }
  }
}

// Voxels per block: R x kHiddenBlock accumulators, 16 of AVX-512's (and NEON's) 32 registers, 12 of AVX2's 16.
constexpr int kVoxelBlock = kAccumulators == 24 ? 4 : 3;
constexpr int64_t kVoxelsPerTask = 1024;

// Voxels [first, last), or those of them `keep` marks (logits 0 for the others).
void head_voxels(const Head& h, const float* x, const float* w1, const float* b1, const float* w2t,
                 const float* b2, float* logits, const bool* keep, int64_t first, int64_t last) {
  int64_t block[kVoxelBlock];
  int filled = 0;
  for (int64_t voxel = first; voxel < last; ++voxel) {
    if (keep && !keep[voxel]) {
      std::fill(logits + voxel * h.outputs, logits + (voxel + 1) * h.outputs, 0.0f);
      continue;
    }
    block[filled++] = voxel;
    if (filled == kVoxelBlock) {
      head_block<kVoxelBlock>(h, x, w1, b1, w2t, b2, logits, block);
      filled = 0;
    }
  }
  for (int r = 0; r < filled; ++r) head_block<1>(h, x, w1, b1, w2t, b2, logits, block + r);
}

ffi::Error RunHead(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w1,
                   ffi::Buffer<ffi::F32>& b1, ffi::Buffer<ffi::F32>& w2t, ffi::Buffer<ffi::F32>& b2, const bool* keep,
                   ffi::ResultBuffer<ffi::F32>& logits) {
  auto xd = x.dimensions(), w1d = w1.dimensions(), w2d = w2t.dimensions(), ld = logits->dimensions();
  if (xd.size() != 2 || w1d.size() != 2 || w2d.size() != 2 || ld.size() != 2)
    return ffi::Error::InvalidArgument("dense head: bad ranks");
  const Head h{xd[0], xd[1], w1d[1], w2d[0]};
  if (w1d[0] != h.channels || h.hidden % (16 * kHiddenBlock) != 0 || w2d[1] != h.hidden ||
      b1.element_count() != h.hidden || b2.element_count() != h.outputs || h.outputs > kMaxOutputs ||
      ld[0] != h.voxels || ld[1] != h.outputs)
    return ffi::Error::InvalidArgument("dense head: inconsistent shapes");
  const float *xp = x.typed_data(), *w1p = w1.typed_data(), *b1p = b1.typed_data();
  const float *w2p = w2t.typed_data(), *b2p = b2.typed_data();
  float* out = logits->typed_data();
  const int64_t tasks = (h.voxels + kVoxelsPerTask - 1) / kVoxelsPerTask;
  run_tasks(pool, tasks, [&h, xp, w1p, b1p, w2p, b2p, out, keep](int64_t task) {
    head_voxels(h, xp, w1p, b1p, w2p, b2p, out, keep, task * kVoxelsPerTask,
                std::min(h.voxels, (task + 1) * kVoxelsPerTask));
  });
  return ffi::Error::Success();
}

ffi::Error DenseHeadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                         ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2t, ffi::Buffer<ffi::F32> b2,
                         ffi::ResultBuffer<ffi::F32> logits) {
  return RunHead(pool, x, w1, b1, w2t, b2, nullptr, logits);
}

// The head at the voxels `keep` (M) marks, logits 0 elsewhere: a study classifies about a quarter of the
// voxels of the blocks it evaluates.
ffi::Error DenseHeadWhereImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                              ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2t, ffi::Buffer<ffi::F32> b2,
                              ffi::Buffer<ffi::PRED> keep, ffi::ResultBuffer<ffi::F32> logits) {
  if (keep.dimensions().size() != 1 || keep.element_count() != x.dimensions()[0])
    return ffi::Error::InvalidArgument("dense head where: one mask value per voxel expected");
  return RunHead(pool, x, w1, b1, w2t, b2, keep.typed_data(), logits);
}

}  // namespace
}  // namespace jaxcascade

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeDenseHead, jaxcascade::DenseHeadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeDenseHeadWhere, jaxcascade::DenseHeadWhereImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
