// The dense form's 2^3 max-pool at every position, taps `dilation` apart, in one pass (layers.dense_max_pool).
//
// XLA:CPU runs it as three one-axis reduce_windows, each writing and reading the whole block; here every
// output reads its 8 taps (a vector of channels at a time) and is written once. Max is exact: the result equals
// XLA's bit for bit.
//
// Layouts: x (N, D, H, W, C) float32, C a multiple of 16; y (N, D - d, H - d, W - d, C).

#include <algorithm>
#include <cstdint>

#include "parallel.h"

namespace jaxcascade {
namespace {

struct Pool {
  int64_t n, d, h, w, c, dilation;
};

void pool_rows(const Pool& p, const float* x, float* y, int64_t first, int64_t last) {
  const int64_t od = p.d - p.dilation, oh = p.h - p.dilation, ow = p.w - p.dilation;
  const int64_t sw = p.c, sh = p.w * sw, sd = p.h * sh, sb = p.d * sd;
  const int64_t taps[8] = {0, p.dilation * sw, p.dilation * sh, p.dilation * (sh + sw), p.dilation * sd,
                           p.dilation * (sd + sw), p.dilation * (sd + sh), p.dilation * (sd + sh + sw)};
  for (int64_t index = first; index < last; ++index) {
    const int64_t row = index % oh, z = (index / oh) % od, batch = index / (oh * od);
    const float* in = x + batch * sb + z * sd + row * sh;
    float* out = y + ((batch * od + z) * oh + row) * ow * p.c;
    for (int64_t col = 0; col < ow; ++col) {
      for (int64_t channel = 0; channel < p.c; channel += kLanes) {
        const float* at = in + col * sw + channel;
        vec best = load(at);
        for (int t = 1; t < 8; ++t) {
          const vec value = load(at + taps[t]);
          best = value > best ? value : best;
        }
        store(out + col * p.c + channel, best);
      }
    }
  }
}

ffi::Error MaxPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       int64_t dilation) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 5 || yd.size() != 5) return ffi::Error::InvalidArgument("max pool: rank 5 expected");
  const Pool p{xd[0], xd[1], xd[2], xd[3], xd[4], dilation};
  if (p.c % 16 != 0 || dilation < 1 || yd[0] != p.n || yd[1] != p.d - dilation || yd[2] != p.h - dilation ||
      yd[3] != p.w - dilation || yd[4] != p.c || yd[1] < 1 || yd[2] < 1 || yd[3] < 1)
    return ffi::Error::InvalidArgument("max pool: inconsistent shapes");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  run_row_chunks(pool, yd[0] * yd[1] * yd[2],
                 [&p, xp, yp](int64_t first, int64_t last) { pool_rows(p, xp, yp, first, last); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxcascade

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeMaxPool, jaxcascade::MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("dilation"));
