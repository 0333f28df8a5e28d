// A direct 3D convolution for XLA:CPU (jaxcascade/cpu_kernel.py builds and registers it).
//
// XLA:CPU runs a 3D convolution either through Eigen (slow) or, as convs.py
// writes it, as a GEMM over a tap buffer that is 27x the input: the buffer's
// memory traffic, not the multiply-adds, is what stays between those forms and
// oneDNN. This kernel never builds the buffer: each thread keeps a block of R
// outputs x O channels in registers and streams the taps and weights through
// them (the register-blocked direct convolution oneDNN uses). Every output is
// summed by one thread in one fixed order (taps a, b, c, then input channels;
// for the Winograd tiles of wide layers over long rows, winograd.h, the tile's fixed
// order), so results do not depend on the thread count.
//
// Layouts: x (N, D, H, W, C), w (K, K, K, C, O), y (N, D', H', W', O), all
// float32 and C-contiguous; VALID padding, `dilation` between taps; O must be
// 16, 32, 48 or 64 (the Python side checks). The register blocking is the
// target's (simd.h): 24 accumulators of 16 floats on AVX-512, 12 of 8 on AVX2. Where a block's pass over
// all the taps would stream more weights than L1 holds (16-register targets, wide inputs), a row's blocks
// go through the kernel one row (a, b) at a time instead (output_row_by_tap_rows), in the same order of sums.
//
// JaxcascadeConv3dWhere also takes keep (N, D', H', W') and computes only the
// outputs it marks (zeros elsewhere; ops/kept_outputs.py): a block of R outputs
// starts at a kept output and ends at the last kept one within it, so the
// dense form's sparse candidates cost about the outputs they read.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel.h"
#include "winograd.h"

namespace jaxcascade {
namespace {

// R consecutive outputs along W, output channels [channel, channel + NV * kLanes), kept in registers; taps c
// in [c_first, c_last) (all of them but where a tap would read the zero padding left or right of the row).
template <int NV, int R>
inline void output_block(const Geometry& g, const float* x, const float* w, float* y, int64_t batch,
                         int64_t z, int64_t row, int64_t col, int64_t c_first, int64_t c_last, int64_t channel) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = vec{};
  const int64_t sh = g.w * g.c, sd = g.h * sh, sb = g.d * sd;
  const int64_t tap_stride = g.c * g.o;
  for (int64_t a = 0; a < g.k; ++a) {
    const int64_t zi = z + a * g.dilation - g.pad;
    if (zi < 0 || zi >= g.d) continue;  // a plane of padding: zeros add nothing
    for (int64_t b = 0; b < g.k; ++b) {
      const int64_t yi = row + b * g.dilation - g.pad;
      if (yi < 0 || yi >= g.h) continue;
      const float* x_row = x + batch * sb + zi * sd + yi * sh;
      const float* wab = w + (a * g.k + b) * g.k * tap_stride + channel;
      if (g.dilation == 1) {
        // Taps (c, ci) of one row are one contiguous run in x and in w: one loop (long for 2-channel input).
        const float* xt = x_row + (col - g.pad) * g.c;
        for (int64_t j = c_first * g.c; j < c_last * g.c; ++j) multiply_add<NV, R>(acc, xt + j, g.c, wab + j * g.o);
        continue;
      }
      for (int64_t c = c_first; c < c_last; ++c) {
        const float* xt = x_row + (col + c * g.dilation - g.pad) * g.c;
        const float* wt = wab + c * tap_stride;
        for (int64_t ci = 0; ci < g.c; ++ci) multiply_add<NV, R>(acc, xt + ci, g.c, wt + ci * g.o);
      }
    }
  }
  float* out = y + (((batch * g.od + z) * g.oh + row) * g.ow + col) * g.o + channel;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * g.o + kLanes * v, acc[r][v]);
}

// The block for every group of NV vectors of output channels (one group on AVX-512).
template <int NV, int R>
inline void output_groups(const Geometry& g, const float* x, const float* w, float* y, int64_t batch,
                          int64_t z, int64_t row, int64_t col, int64_t c_first, int64_t c_last) {
  if constexpr (kOneGroup) {
    output_block<NV, R>(g, x, w, y, batch, z, row, col, c_first, c_last, 0);
  } else {
    for (int64_t channel = 0; channel < g.o; channel += NV * kLanes)
      output_block<NV, R>(g, x, w, y, batch, z, row, col, c_first, c_last, channel);
  }
}

// Outputs [col, col + width) with every tap c inside the row (no padding read along W).
template <int NV, int R>
void interior_block(const Geometry& g, const float* x, const float* w, float* y, int64_t batch, int64_t z,
                    int64_t row, int64_t col, int64_t width) {
  if constexpr (R > 0) {
    if (width == R)
      output_groups<NV, R>(g, x, w, y, batch, z, row, col, 0, g.k);
    else
      interior_block<NV, R - 1>(g, x, w, y, batch, z, row, col, width);
  }
}

// Tap rows outermost (below): R outputs' sums over the taps (c, ci) of one kernel row (a, b). The sums start
// from zero at the first row summed and from what `out` holds after it, in output_block's order: the same
// result, bit for bit. Its inner loops repeat output_block's: a shared helper changed 23 of the AVX-512
// build's 44 compute functions (objdump), whose code this change leaves as it was measured.
template <int NV, int R>
inline void tap_row_block(const Geometry& g, const float* x_row, const float* wab, float* out, int64_t col,
                          int64_t c_first, int64_t c_last, bool first) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? vec{} : load(out + r * g.o + kLanes * v);
  if (g.dilation == 1) {
    const float* xt = x_row + (col - g.pad) * g.c;
    for (int64_t j = c_first * g.c; j < c_last * g.c; ++j) multiply_add<NV, R>(acc, xt + j, g.c, wab + j * g.o);
  } else {
    for (int64_t c = c_first; c < c_last; ++c) {
      const float* xt = x_row + (col + c * g.dilation - g.pad) * g.c;
      const float* wt = wab + c * g.c * g.o;
      for (int64_t ci = 0; ci < g.c; ++ci) multiply_add<NV, R>(acc, xt + ci, g.c, wt + ci * g.o);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * g.o + kLanes * v, acc[r][v]);
}

template <int NV, int R>
void tap_row_width(const Geometry& g, const float* x_row, const float* wab, float* out, int64_t col, int width,
                   int64_t c_first, int64_t c_last, bool first) {
  if constexpr (R > 0) {
    if (width < R) return tap_row_width<NV, R - 1>(g, x_row, wab, out, col, width, c_first, c_last, first);
    for (int64_t channel = 0; channel < g.o; channel += NV * kLanes)
      tap_row_block<NV, R>(g, x_row, wab + channel, out + channel, col, c_first, c_last, first);
  }
}

struct Block {
  int64_t col, width, c_first, c_last;
};

// One output row with the kernel's rows (a, b) outermost, where a block's pass over all the taps streams more
// weights than L1 holds (AVX2: 3 outputs a block, 64 channels from 32: 110 KB a channel group, re-read from L2
// for every 3 outputs: 82 GFLOP/s on a Zen 4 core, 105 this way; benchmarks.kernel_core). One kernel row's
// weights (12 KB there) stay in L1 for the row's
// blocks; each block's sums go to `out` and back once per kernel row, a few loads and stores per
// k * C * NV * R multiply-adds.
template <int NV>
void output_row_by_tap_rows(const Geometry& g, const float* x, const float* w, float* y, const bool* kept,
                            int64_t index, int64_t interior_first, int64_t interior_last) {
  constexpr int R = block_outputs(NV);
  const int64_t row = index % g.oh, z = (index / g.oh) % g.od, batch = index / (g.oh * g.od);
  float* out = y + index * g.ow * g.o;
  Block blocks[256];
  int count = 0;
  for (int64_t col = 0; col < g.ow;) {  // output_rows' blocks, in its order
    if (kept && !kept[col]) {
      ++col;
      continue;
    }
    if (col >= interior_first && col < interior_last) {
      int64_t width = std::min<int64_t>(R, interior_last - col);
      if (kept)
        while (!kept[col + width - 1]) --width;
      blocks[count++] = {col, width, 0, g.k};
      col += width;
      continue;
    }
    const int64_t c_first = std::max<int64_t>(0, (g.pad - col + g.dilation - 1) / g.dilation);
    const int64_t c_last = std::min<int64_t>(g.k, (g.w - 1 - col + g.pad) / g.dilation + 1);
    blocks[count++] = {col, 1, c_first, std::max(c_first, c_last)};
    ++col;
  }
  const int64_t sh = g.w * g.c, sd = g.h * sh, sb = g.d * sd;
  bool first = true;
  for (int64_t a = 0; a < g.k; ++a) {
    const int64_t zi = z + a * g.dilation - g.pad;
    if (zi < 0 || zi >= g.d) continue;
    for (int64_t b = 0; b < g.k; ++b) {
      const int64_t yi = row + b * g.dilation - g.pad;
      if (yi < 0 || yi >= g.h) continue;
      const float* x_row = x + batch * sb + zi * sd + yi * sh;
      const float* wab = w + (a * g.k + b) * g.k * g.c * g.o;
      for (int i = 0; i < count; ++i) {
        const Block& block = blocks[i];
        tap_row_width<NV, R>(g, x_row, wab, out + block.col * g.o, block.col, static_cast<int>(block.width),
                             block.c_first, block.c_last, first);
      }
      first = false;
    }
  }
  if (first)  // no kernel row reads the input (cannot happen for the shapes Convolve accepts): zeros
    std::fill(out, out + g.ow * g.o, 0.0f);
  if (kept)
    for (int64_t col = 0; col < g.ow; ++col)
      if (!kept[col]) std::fill(out + col * g.o, out + (col + 1) * g.o, 0.0f);
}

// Bytes of weights that one block's pass over every tap reads, above which output_row_by_tap_rows runs
// (an L1 of 32 KB holds its kernel row's weights and the input rows beside them).
constexpr int64_t kTapRowsAboveBytes = 24 * 1024;

template <int NV>
void output_rows(const Geometry& g, const float* x, const float* w, float* y, const bool* keep, int64_t first,
                 int64_t last) {
  constexpr int R = block_outputs(NV);  // simd.h
  const int64_t span = (g.k - 1) * g.dilation;
  // Outputs whose taps all fall inside the row: [interior_first, interior_last).
  const int64_t interior_first = std::min(g.ow, g.pad);
  const int64_t interior_last = std::max(interior_first, std::min(g.ow, g.w + g.pad - span));
  // AVX-512's blocks (12-24 outputs) stream the weights slowly enough from L2: its code is left as it was.
  if constexpr (!kOneGroup) {
    // Rows of a few blocks (a training batch's 2^3 outputs) share too little to pay for the sums' round trips.
    if (g.k * g.k * g.k * g.c * NV * kLanes * 4 > kTapRowsAboveBytes && g.ow >= 4 * R && g.ow <= 256) {
      for (int64_t index = first; index < last; ++index)
        output_row_by_tap_rows<NV>(g, x, w, y, keep ? keep + index * g.ow : nullptr, index, interior_first,
                                   interior_last);
      return;
    }
  }
  for (int64_t index = first; index < last; ++index) {
    const int64_t row = index % g.oh, z = (index / g.oh) % g.od, batch = index / (g.oh * g.od);
    const bool* kept = keep ? keep + index * g.ow : nullptr;  // this row's outputs to compute (all: nullptr)
    float* out = y + index * g.ow * g.o;
    for (int64_t col = 0; col < g.ow;) {
      if (kept && !kept[col]) {
        std::fill(out + col * g.o, out + (col + 1) * g.o, 0.0f);
        ++col;
        continue;
      }
      if (col >= interior_first && col < interior_last) {
        int64_t width = std::min<int64_t>(R, interior_last - col);
        if (kept)  // the block ends at its last kept output: fewer multiply-adds for the same weight loads
          while (!kept[col + width - 1]) --width;
        interior_block<NV, R>(g, x, w, y, batch, z, row, col, width);
        if (kept)
          for (int64_t c = col; c < col + width; ++c)
            if (!kept[c]) std::fill(out + c * g.o, out + (c + 1) * g.o, 0.0f);
        col += width;
        continue;
      }
      // One output at the padded edge: only the taps that read the row.
      const int64_t c_first = std::max<int64_t>(0, (g.pad - col + g.dilation - 1) / g.dilation);
      const int64_t c_last = std::min<int64_t>(g.k, (g.w - 1 - col + g.pad) / g.dilation + 1);
      output_groups<NV, 1>(g, x, w, y, batch, z, row, col, c_first, std::max(c_first, c_last));
      ++col;
    }
  }
}

void run_rows(const Geometry& g, const float* x, const float* w, float* y, const bool* keep, int64_t first,
              int64_t last) {
  switch (group_vectors(g.o / kLanes)) {  // the caller checked O is 16, 32, 48 or 64
    case 1: output_rows<1>(g, x, w, y, keep, first, last); break;
    case 2: output_rows<2>(g, x, w, y, keep, first, last); break;
    case 3: output_rows<3>(g, x, w, y, keep, first, last); break;
    default: output_rows<4>(g, x, w, y, keep, first, last); break;
  }
}

// The weights and their transform (U), kept from the last call: the dense form calls the layer hundreds of times
// a brain with the same weights, and the transform (0.3 ms) would take a few % of the stage. U is a function of
// the weights' bits, so reusing it changes no result.
struct TransformedWeights {
  int64_t c, o;
  std::vector<float> w, u;
};

std::shared_ptr<const TransformedWeights> transformed_weights(const Geometry& g, const float* w) {
  static std::mutex mutex;
  static std::shared_ptr<const TransformedWeights> last;
  const int64_t count = 27 * g.c * g.o;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (last && last->c == g.c && last->o == g.o && std::memcmp(last->w.data(), w, count * sizeof(float)) == 0)
      return last;
  }
  auto fresh = std::make_shared<TransformedWeights>();
  fresh->c = g.c;
  fresh->o = g.o;
  fresh->w.assign(w, w + count);
  fresh->u.resize(64 * g.c * g.o);
  transform_weights(g, w, fresh->u.data());
  std::lock_guard<std::mutex> lock(mutex);
  last = fresh;
  return fresh;
}

void run_winograd(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* w, float* y,
                  const bool* keep) {
  const std::shared_ptr<const TransformedWeights> weights = transformed_weights(g, w);
  const float* up = weights->u.data();
  run_row_chunks(pool, tile_rows(g), [&g, x, up, y, keep](int64_t first, int64_t last) {
    run_tile_rows(g, x, up, y, keep, first, last);
  });
}

// keep: nullptr, or which outputs to compute (N, D', H', W'); the others are written as zeros.
ffi::Error Convolve(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, const bool* keep,
                    ffi::ResultBuffer<ffi::F32>& y, int64_t dilation, int64_t padding) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 5 || wd.size() != 5 || yd.size() != 5) return ffi::Error::InvalidArgument("rank 5 expected");
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], wd[0], wd[4], dilation, yd[1], yd[2], yd[3], padding};
  const int64_t span = (g.k - 1) * g.dilation;
  // Zeros pad before each axis; the output extends at most as far past the input.
  auto fits = [&](int64_t in, int64_t out) { return out > 0 && out + span <= in + 2 * padding; };
  if (wd[1] != g.k || wd[2] != g.k || wd[3] != g.c || g.o % 16 != 0 || g.o > 64 || yd[0] != g.n ||
      yd[4] != g.o || padding < 0 || padding > span || !fits(g.d, g.od) || !fits(g.h, g.oh) || !fits(g.w, g.ow))
    return ffi::Error::InvalidArgument("conv3d: inconsistent shapes");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (winograd_applies(g)) {
    run_winograd(pool, g, xp, wp, yp, keep);
    return ffi::Error::Success();
  }
  run_row_chunks(pool, g.n * g.od * g.oh, [&g, xp, wp, yp, keep](int64_t first, int64_t last) {
    run_rows(g, xp, wp, yp, keep, first, last);
  });
  return ffi::Error::Success();
}

ffi::Error Conv3dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, int64_t dilation, int64_t padding) {
  return Convolve(pool, x, w, nullptr, y, dilation, padding);
}

// The convolution at the outputs `keep` marks, zeros elsewhere: the dense form computes only what the voxels
// it classifies read.
ffi::Error Conv3dWhereImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::PRED> keep, ffi::ResultBuffer<ffi::F32> y, int64_t dilation,
                           int64_t padding) {
  auto kd = keep.dimensions(), yd = y->dimensions();
  if (kd.size() != 4 || yd.size() != 5 || kd[0] != yd[0] || kd[1] != yd[1] || kd[2] != yd[2] || kd[3] != yd[3])
    return ffi::Error::InvalidArgument("conv3d where: the mask's shape is not the output's");
  return Convolve(pool, x, w, keep.typed_data(), y, dilation, padding);
}


// The kernel's gradient: dw[a, b, c, ci, o] = sum over n and outputs p of x[n, p + (a, b, c) * dilation, ci] * dy[n, p, o].
// R rows (tap, input channel) x O channels in registers, one pass over a chunk of output positions. Chunks
// and row blocks are fixed by the shapes alone and partial sums are added in chunk order, so the result
// does not depend on the thread count either.
struct Gradient {
  Geometry g;
  int64_t chunks, positions_per_chunk;
};

template <int NV, int R>
void gradient_block(const Gradient& q, const float* x, const float* dy, float* partial, int64_t first_row,
                    int64_t chunk, int64_t channel) {
  const Geometry& g = q.g;
  const int64_t sh = g.w * g.c, sd = g.h * sh, sb = g.d * sd;
  int64_t offset[R];
  for (int r = 0; r < R; ++r) {
    const int64_t row = first_row + r, tap = row / g.c, ci = row % g.c;
    const int64_t a = tap / (g.k * g.k), b = (tap / g.k) % g.k, c = tap % g.k;
    offset[r] = (a * sd + b * sh + c * g.c) * g.dilation + ci;
  }
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = vec{};
  const int64_t total = g.n * g.od * g.oh * g.ow;
  const int64_t begin = chunk * q.positions_per_chunk, end = std::min(total, begin + q.positions_per_chunk);
  int64_t w = begin % g.ow, rest = begin / g.ow;
  int64_t y = rest % g.oh, z = (rest / g.oh) % g.od, n = rest / (g.oh * g.od);
  const float* base = x + n * sb + z * sd + y * sh + w * g.c;
  for (int64_t p = begin; p < end; ++p) {
    if constexpr (kBroadcastFirst) {  // as in multiply_add
      vec s[R];
      for (int r = 0; r < R; ++r) s[r] = splat(base[offset[r]]);
      for (int j = 0; j < NV; ++j) {
        vec gv = load(dy + p * g.o + channel + kLanes * j);
        in_register(gv);
        for (int r = 0; r < R; ++r) acc[r][j] += s[r] * gv;
      }
    } else {
      vec gv[NV];
      for (int j = 0; j < NV; ++j) gv[j] = load(dy + p * g.o + channel + kLanes * j);
      for (int r = 0; r < R; ++r) {
        const float s = base[offset[r]];
        for (int j = 0; j < NV; ++j) acc[r][j] += s * gv[j];
      }
    }
    // the next output position, and where its taps start in x
    if (++w == g.ow) {
      w = 0;
      if (++y == g.oh) {
        y = 0;
        if (++z == g.od) {
          z = 0;
          ++n;
        }
      }
      base = x + n * sb + z * sd + y * sh;
    } else {
      base += g.c;
    }
  }
  float* out = partial + (chunk * g.k * g.k * g.k * g.c + first_row) * g.o + channel;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(out + r * g.o + kLanes * j, acc[r][j]);
}

template <int NV, int R>
void gradient_rows(const Gradient& q, const float* x, const float* dy, float* partial, int64_t first_row,
                   int64_t rows, int64_t chunk) {
  if constexpr (R > 0) {
    if (rows == R) {
      if constexpr (kOneGroup) {
        gradient_block<NV, R>(q, x, dy, partial, first_row, chunk, 0);
      } else {
        for (int64_t channel = 0; channel < q.g.o; channel += NV * kLanes)
          gradient_block<NV, R>(q, x, dy, partial, first_row, chunk, channel);
      }
    } else
      gradient_rows<NV, R - 1>(q, x, dy, partial, first_row, rows, chunk);
  }
}

constexpr int kGradientRows = kAccumulators / kMaxVectors;  // rows per block: 6 x 4 registers on AVX-512

void gradient_task(const Gradient& q, const float* x, const float* dy, float* partial, int64_t task) {
  const int64_t rows = q.g.k * q.g.k * q.g.k * q.g.c;
  const int64_t blocks = (rows + kGradientRows - 1) / kGradientRows;
  const int64_t chunk = task / blocks, first = (task % blocks) * kGradientRows;
  const int64_t count = std::min<int64_t>(kGradientRows, rows - first);
  switch (group_vectors(q.g.o / kLanes)) {
    case 1: gradient_rows<1, kGradientRows>(q, x, dy, partial, first, count, chunk); break;
    case 2: gradient_rows<2, kGradientRows>(q, x, dy, partial, first, count, chunk); break;
    case 3: gradient_rows<3, kGradientRows>(q, x, dy, partial, first, count, chunk); break;
    default: gradient_rows<4, kGradientRows>(q, x, dy, partial, first, count, chunk); break;
  }
}

ffi::Error KernelGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> partial,
                              int64_t dilation) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions(), pd = partial->dimensions();
  if (xd.size() != 5 || yd.size() != 5 || wd.size() != 5 || pd.size() != 2)
    return ffi::Error::InvalidArgument("conv3d kernel gradient: bad ranks");
  Gradient q{{xd[0], xd[1], xd[2], xd[3], xd[4], wd[0], wd[4], dilation, yd[1], yd[2], yd[3]}, pd[0], 0};
  const Geometry& g = q.g;
  const int64_t span = (g.k - 1) * g.dilation, rows = g.k * g.k * g.k * g.c;
  if (wd[1] != g.k || wd[2] != g.k || wd[3] != g.c || g.o % 16 != 0 || g.o > 64 || yd[0] != g.n ||
      yd[4] != g.o || g.od != g.d - span || g.oh != g.h - span || g.ow != g.w - span ||
      pd[1] != rows * g.o || q.chunks < 1)
    return ffi::Error::InvalidArgument("conv3d kernel gradient: inconsistent shapes");
  const int64_t total = g.n * g.od * g.oh * g.ow;
  q.positions_per_chunk = (total + q.chunks - 1) / q.chunks;
  const int64_t blocks = (rows + kGradientRows - 1) / kGradientRows;
  const float* xp = x.typed_data();
  const float* yp = dy.typed_data();
  float* pp = partial->typed_data();
  float* out = dw->typed_data();
  run_tasks(pool, q.chunks * blocks, [&q, xp, yp, pp](int64_t task) { gradient_task(q, xp, yp, pp, task); });
  // chunk partial sums, added in chunk order
  const int64_t size = rows * g.o;
  std::memcpy(out, pp, size * sizeof(float));
  for (int64_t chunk = 1; chunk < q.chunks; ++chunk)
    for (int64_t i = 0; i < size; ++i) out[i] += pp[chunk * size + i];
  return ffi::Error::Success();
}
}  // namespace
}  // namespace jaxcascade

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeConv3d, jaxcascade::Conv3dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("dilation")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeConv3dWhere, jaxcascade::Conv3dWhereImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("dilation")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeConv3dKernelGradient, jaxcascade::KernelGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("dilation"));

// Which variant this library is (simd.h), for the loader to check against the one it asked for.
extern "C" __attribute__((visibility("default"))) const char* JaxcascadeKernelIsa() { return jaxcascade::kIsa; }
