// A direct 3D convolution for XLA:CPU (jaxcascade/cpu_kernel.py builds and registers it).
//
// XLA:CPU runs a 3D convolution either through Eigen (slow) or, as convs.py
// writes it, as a GEMM over a tap buffer that is 27x the input: the buffer's
// memory traffic, not the multiply-adds, is what stays between those forms and
// oneDNN. This kernel never builds the buffer: each thread keeps a block of R
// outputs x O channels in registers and streams the taps and weights through
// them (the register-blocked direct convolution oneDNN uses). Every output is
// summed by one thread in one fixed order (taps a, b, c, then input channels),
// so results do not depend on the thread count.
//
// Layouts: x (N, D, H, W, C), w (K, K, K, C, O), y (N, D', H', W', O), all
// float32 and C-contiguous; VALID padding, `dilation` between taps; O must be
// 16, 32, 48 or 64 (the Python side checks).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register (GCC splits it where the CPU has narrower ones).
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

struct Geometry {
  int64_t n, d, h, w, c;       // input
  int64_t k, o, dilation;      // kernel
  int64_t od, oh, ow;          // output
};

// R consecutive outputs along W, NV * 16 output channels, kept in registers.
template <int NV, int R>
inline void output_block(const Geometry& g, const float* x, const float* w, float* y, int64_t batch,
                         int64_t z, int64_t row, int64_t col) {
  v16 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = v16{};
  const int64_t sh = g.w * g.c, sd = g.h * sh, sb = g.d * sd;
  const int64_t tap_stride = g.c * g.o;
  for (int64_t a = 0; a < g.k; ++a) {
    for (int64_t b = 0; b < g.k; ++b) {
      const float* xab = x + batch * sb + (z + a * g.dilation) * sd + (row + b * g.dilation) * sh + col * g.c;
      const float* wab = w + (a * g.k + b) * g.k * tap_stride;
      for (int64_t c = 0; c < g.k; ++c) {
        const float* xt = xab + c * g.dilation * g.c;
        const float* wt = wab + c * tap_stride;
        for (int64_t ci = 0; ci < g.c; ++ci) {
          v16 wv[NV];
          for (int j = 0; j < NV; ++j) wv[j] = *reinterpret_cast<const v16u*>(wt + ci * g.o + 16 * j);
          for (int r = 0; r < R; ++r) {
            const float s = xt[r * g.c + ci];
            for (int j = 0; j < NV; ++j) acc[r][j] += s * wv[j];
          }
        }
      }
    }
  }
  float* out = y + (((batch * g.od + z) * g.oh + row) * g.ow + col) * g.o;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) *reinterpret_cast<v16u*>(out + r * g.o + 16 * j) = acc[r][j];
}

// The last outputs of a row (fewer than R), as one block of exactly that width.
template <int NV, int R>
void row_tail(const Geometry& g, const float* x, const float* w, float* y, int64_t batch, int64_t z,
              int64_t row, int64_t col, int64_t left) {
  if constexpr (R > 0) {
    if (left == R)
      output_block<NV, R>(g, x, w, y, batch, z, row, col);
    else
      row_tail<NV, R - 1>(g, x, w, y, batch, z, row, col, left);
  }
}

template <int NV>
void output_rows(const Geometry& g, const float* x, const float* w, float* y, int64_t first, int64_t last) {
  constexpr int R = 24 / NV;  // 24 accumulators + NV weight registers of the 32 AVX-512 has
  for (int64_t index = first; index < last; ++index) {
    const int64_t row = index % g.oh, z = (index / g.oh) % g.od, batch = index / (g.oh * g.od);
    int64_t col = 0;
    for (; col + R <= g.ow; col += R) output_block<NV, R>(g, x, w, y, batch, z, row, col);
    if (col < g.ow) row_tail<NV, R - 1>(g, x, w, y, batch, z, row, col, g.ow - col);
  }
}

void run_rows(const Geometry& g, const float* x, const float* w, float* y, int64_t first, int64_t last) {
  switch (g.o / 16) {  // the caller checked O is 16, 32, 48 or 64
    case 1: output_rows<1>(g, x, w, y, first, last); break;
    case 2: output_rows<2>(g, x, w, y, first, last); break;
    case 3: output_rows<3>(g, x, w, y, first, last); break;
    default: output_rows<4>(g, x, w, y, first, last); break;
  }
}

// Rows handed out in chunks from a shared counter: the calling thread works too,
// so nothing waits on a pool thread that has not started.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t rows = 0, chunk = 1;
  std::mutex mutex;
  std::condition_variable finished;
};

void work_on(const std::shared_ptr<Work>& work, const Geometry& g, const float* x, const float* w, float* y) {
  for (;;) {
    const int64_t first = work->next.fetch_add(work->chunk);
    if (first >= work->rows) return;
    const int64_t last = std::min(work->rows, first + work->chunk);
    run_rows(g, x, w, y, first, last);
    if (work->done.fetch_add(last - first) + (last - first) == work->rows) {
      std::lock_guard<std::mutex> lock(work->mutex);
      work->finished.notify_all();
    }
  }
}

ffi::Error Conv3dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, int64_t dilation) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 5 || wd.size() != 5 || yd.size() != 5) return ffi::Error::InvalidArgument("rank 5 expected");
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], wd[0], wd[4], dilation, yd[1], yd[2], yd[3]};
  const int64_t span = (g.k - 1) * g.dilation;
  if (wd[1] != g.k || wd[2] != g.k || wd[3] != g.c || g.o % 16 != 0 || g.o > 64 || yd[0] != g.n ||
      yd[4] != g.o || g.od != g.d - span || g.oh != g.h - span || g.ow != g.w - span)
    return ffi::Error::InvalidArgument("conv3d: inconsistent shapes");
  auto work = std::make_shared<Work>();
  work->rows = g.n * g.od * g.oh;
  if (work->rows == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // A few chunks per thread balance rows of unequal cost without much contention.
  work->chunk = std::max<int64_t>(1, work->rows / (4 * (threads + 1)));
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  for (int64_t t = 0; t < threads; ++t) pool.Schedule([work, g, xp, wp, yp] { work_on(work, g, xp, wp, yp); });
  work_on(work, g, xp, wp, yp);
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == work->rows; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeConv3d, Conv3dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("dilation"));
