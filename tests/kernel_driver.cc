// The C++ kernels against naive loops, without XLA: for variants the Python tests cannot load on this machine
// (the ARM build under qemu-aarch64, the SSE build). tests/test_kernel_variants.py compiles and runs it.
// Exit status 0 and "ok <variant>" when every output matches.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../jaxcascade/ops/kernels/conv3d.cc"
#include "../jaxcascade/ops/kernels/dense_head.cc"
#include "../jaxcascade/ops/kernels/max_pool.cc"
#include "../jaxcascade/ops/kernels/nicms_features.cc"

namespace {

unsigned state = 12345;
float next_float() {  // a fixed sequence in [-1, 1): the same on every machine
  state = state * 1664525u + 1013904223u;
  return static_cast<float>(state >> 8) / 8388608.0f - 1.0f;
}

std::vector<float> random_floats(size_t count) {
  std::vector<float> values(count);
  for (float& value : values) value = next_float();
  return values;
}

int failures = 0;
void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tolerance) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::fmax(worst, std::fabs(got[i] - want[i]));
  if (!(worst <= tolerance)) {
    std::printf("FAIL %s: max error %g > %g\n", what, worst, tolerance);
    ++failures;
  }
}

// One convolution: every output block and channel group of the variant, padding and a sparse `keep`.
void conv_case(int64_t n, int64_t d, int64_t h, int64_t w, int64_t c, int64_t k, int64_t o, int64_t dilation,
               int64_t pad, bool sparse) {
  using jaxcascade::Geometry;
  const int64_t span = (k - 1) * dilation;
  Geometry g{n, d, h, w, c, k, o, dilation, d + 2 * pad - span, h + 2 * pad - span, w + 2 * pad - span, pad};
  std::vector<float> x = random_floats(n * d * h * w * c), kernel = random_floats(k * k * k * c * o);
  const int64_t outputs = n * g.od * g.oh * g.ow;
  std::vector<unsigned char> keep_bytes(outputs);
  for (int64_t i = 0; i < outputs; ++i) keep_bytes[i] = (i * 7 + i / 5) % 3 != 0;
  bool* keep = sparse ? reinterpret_cast<bool*>(keep_bytes.data()) : nullptr;
  std::vector<float> y(outputs * o, -1.0f);
  if (jaxcascade::winograd_applies(g)) {  // the wide layers' Winograd tiles, as Convolve runs them
    std::vector<float> u(64 * c * o);
    jaxcascade::transform_weights(g, kernel.data(), u.data());
    jaxcascade::run_tile_rows(g, x.data(), u.data(), y.data(), keep, 0, jaxcascade::tile_rows(g));
  } else {
    jaxcascade::run_rows(g, x.data(), kernel.data(), y.data(), keep, 0, n * g.od * g.oh);
  }
  std::vector<double> want(outputs * o, 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t z = 0; z < g.od; ++z)
      for (int64_t r = 0; r < g.oh; ++r)
        for (int64_t col = 0; col < g.ow; ++col) {
          const int64_t index = ((b * g.od + z) * g.oh + r) * g.ow + col;
          if (sparse && !keep_bytes[index]) continue;
          for (int64_t a = 0; a < k; ++a)
            for (int64_t bb = 0; bb < k; ++bb)
              for (int64_t cc = 0; cc < k; ++cc) {
                const int64_t zi = z + a * dilation - pad, yi = r + bb * dilation - pad, xi = col + cc * dilation - pad;
                if (zi < 0 || zi >= d || yi < 0 || yi >= h || xi < 0 || xi >= w) continue;
                for (int64_t ci = 0; ci < c; ++ci)
                  for (int64_t oc = 0; oc < o; ++oc)
                    want[index * o + oc] += double(x[(((b * d + zi) * h + yi) * w + xi) * c + ci]) *
                                            kernel[(((a * k + bb) * k + cc) * c + ci) * o + oc];
              }
        }
  char what[160];
  std::snprintf(what, sizeof what, "conv %lldx%lldx%lldx%lldx%lld k%lld o%lld dilation %lld pad %lld%s", (long long)n,
                (long long)d, (long long)h, (long long)w, (long long)c, (long long)k, (long long)o,
                (long long)dilation, (long long)pad, sparse ? " sparse" : "");
  check(what, y, want, 1e-4 * std::sqrt(double(k * k * k * c)));
}

void gradient_case(int64_t o) {
  using jaxcascade::Geometry;
  const int64_t n = 2, d = 5, h = 6, w = 9, c = 3, k = 3;
  jaxcascade::Gradient q{{n, d, h, w, c, k, o, 1, d - 2, h - 2, w - 2}, 1, 0};
  const Geometry& g = q.g;
  const int64_t positions = n * g.od * g.oh * g.ow, rows = k * k * k * c;
  q.positions_per_chunk = positions;
  std::vector<float> x = random_floats(n * d * h * w * c), dy = random_floats(positions * o), dw(rows * o, -1.0f);
  const int64_t blocks = (rows + jaxcascade::kGradientRows - 1) / jaxcascade::kGradientRows;
  for (int64_t task = 0; task < blocks; ++task) jaxcascade::gradient_task(q, x.data(), dy.data(), dw.data(), task);
  std::vector<double> want(rows * o, 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t z = 0; z < g.od; ++z)
      for (int64_t r = 0; r < g.oh; ++r)
        for (int64_t col = 0; col < g.ow; ++col)
          for (int64_t tap = 0; tap < k * k * k; ++tap)
            for (int64_t ci = 0; ci < c; ++ci)
              for (int64_t oc = 0; oc < o; ++oc) {
                const int64_t a = tap / 9, bb = (tap / 3) % 3, cc = tap % 3;
                want[(tap * c + ci) * o + oc] += double(x[(((b * d + z + a) * h + r + bb) * w + col + cc) * c + ci]) *
                                                 dy[(((b * g.od + z) * g.oh + r) * g.ow + col) * o + oc];
              }
  check(o == 64 ? "kernel gradient o64" : "kernel gradient", dw, want, 1e-3);
}

void head_case(int64_t voxels, int64_t hidden, int64_t outputs) {
  const int64_t channels = 64;
  jaxcascade::Head h{voxels, channels, hidden, outputs};
  std::vector<float> x = random_floats(voxels * channels), w1 = random_floats(channels * hidden);
  std::vector<float> b1 = random_floats(hidden), w2t = random_floats(outputs * hidden), b2 = random_floats(outputs);
  std::vector<float> logits(voxels * outputs, -1.0f);
  jaxcascade::head_voxels(h, x.data(), w1.data(), b1.data(), w2t.data(), b2.data(), logits.data(), nullptr, 0, voxels);
  std::vector<double> want(voxels * outputs);
  for (int64_t v = 0; v < voxels; ++v)
    for (int64_t out = 0; out < outputs; ++out) {
      double total = b2[out];
      for (int64_t unit = 0; unit < hidden; ++unit) {
        double sum = b1[unit];
        for (int64_t ci = 0; ci < channels; ++ci) sum += double(x[v * channels + ci]) * w1[ci * hidden + unit];
        total += (sum > 0 ? sum : 0) * w2t[out * hidden + unit];
      }
      want[v * outputs + out] = total;
    }
  check("dense head", logits, want, 1e-3);
}

void pool_case(int64_t dilation) {
  const jaxcascade::Pool p{2, 6, 5, 7, 32, dilation};
  const int64_t od = p.d - dilation, oh = p.h - dilation, ow = p.w - dilation;
  std::vector<float> x = random_floats(p.n * p.d * p.h * p.w * p.c), y(p.n * od * oh * ow * p.c);
  jaxcascade::pool_rows(p, x.data(), y.data(), 0, p.n * od * oh);
  std::vector<double> want(y.size());
  for (int64_t b = 0; b < p.n; ++b)
    for (int64_t z = 0; z < od; ++z)
      for (int64_t r = 0; r < oh; ++r)
        for (int64_t col = 0; col < ow; ++col)
          for (int64_t ch = 0; ch < p.c; ++ch) {
            float best = -INFINITY;
            for (int t = 0; t < 8; ++t) {
              const int64_t zi = z + (t >> 2) * dilation, yi = r + ((t >> 1) & 1) * dilation, xi = col + (t & 1) * dilation;
              best = std::fmax(best, x[(((b * p.d + zi) * p.h + yi) * p.w + xi) * p.c + ch]);
            }
            want[(((b * od + z) * oh + r) * ow + col) * p.c + ch] = best;
          }
  check("max pool", y, want, 0.0);  // exact
}

// nicMSlesions' convolutional stack on one patch (nicms_features.cc) against the layers in double precision.
std::vector<double> same_layer(const std::vector<double>& x, int64_t s, int64_t c, const std::vector<float>& k,
                               const std::vector<float>& scale, const std::vector<float>& shift,
                               const std::vector<float>& slope, int64_t o) {
  std::vector<double> y(s * s * s * o, 0.0);
  for (int64_t z = 0; z < s; ++z)
    for (int64_t r = 0; r < s; ++r)
      for (int64_t col = 0; col < s; ++col)
        for (int64_t oc = 0; oc < o; ++oc) {
          double sum = 0;
          for (int64_t tap = 0; tap < 27; ++tap) {
            const int64_t zi = z + tap / 9 - 1, yi = r + (tap / 3) % 3 - 1, xi = col + tap % 3 - 1;
            if (zi < 0 || zi >= s || yi < 0 || yi >= s || xi < 0 || xi >= s) continue;
            for (int64_t ci = 0; ci < c; ++ci) sum += x[((zi * s + yi) * s + xi) * c + ci] * k[(tap * c + ci) * o + oc];
          }
          const int64_t at = ((z * s + r) * s + col) * o + oc;
          const double v = sum * scale[oc] + shift[oc];
          y[at] = v > 0 ? v : v * slope[at];
        }
  return y;
}

std::vector<double> pooled(const std::vector<double>& x, int64_t s, int64_t c) {
  const int64_t n = s / 2;
  std::vector<double> y(n * n * n * c, -INFINITY);
  for (int64_t z = 0; z < 2 * n; ++z)
    for (int64_t r = 0; r < 2 * n; ++r)
      for (int64_t col = 0; col < 2 * n; ++col)
        for (int64_t ch = 0; ch < c; ++ch) {
          double& best = y[(((z / 2) * n + r / 2) * n + col / 2) * c + ch];
          best = std::fmax(best, x[((z * s + r) * s + col) * c + ch]);
        }
  return y;
}

void nicms_case(int64_t p, int64_t c) {
  const int64_t widths[4] = {32, 32, 64, 64}, sizes[4] = {p, p, p / 2, p / 2};
  std::vector<float> kernels[4], scales[4], shifts[4], slopes[4];
  jaxcascade::Layer layers[4];
  int64_t in = c;
  for (int i = 0; i < 4; ++i) {
    const int64_t o = widths[i], s = sizes[i];
    kernels[i] = random_floats(27 * in * o);
    scales[i] = random_floats(o);
    shifts[i] = random_floats(o);
    slopes[i] = random_floats(s * s * s * o);
    layers[i] = {kernels[i].data(), scales[i].data(), shifts[i].data(), slopes[i].data(), s, in, o};
    in = o;
  }
  const std::vector<float> patch = random_floats(p * p * p * c);
  const int64_t r = p / 4;
  std::vector<float> features(r * r * r * 64, -1.0f);
  jaxcascade::Scratch scratch;
  scratch.fit(p, c);
  const jaxcascade::TiledLayers tiled(layers);  // the second and fourth layers as Winograd tiles
  jaxcascade::one_patch(layers, tiled.u, patch.data(), features.data(), scratch);
  std::vector<double> x(patch.begin(), patch.end());
  x = same_layer(x, p, c, kernels[0], scales[0], shifts[0], slopes[0], 32);
  x = pooled(same_layer(x, p, 32, kernels[1], scales[1], shifts[1], slopes[1], 32), p, 32);
  x = same_layer(x, p / 2, 32, kernels[2], scales[2], shifts[2], slopes[2], 64);
  x = pooled(same_layer(x, p / 2, 64, kernels[3], scales[3], shifts[3], slopes[3], 64), p / 2, 64);
  char what[64];
  std::snprintf(what, sizeof what, "nicms features %lld^3 x %lld", (long long)p, (long long)c);
  double largest = 0;  // four layers of sums of up to 1,728 products: float32 rounding relative to the largest
  for (double v : x) largest = std::fmax(largest, std::fabs(v));
  check(what, features, x, 2e-5 * largest);
}

}  // namespace

int main() {
  for (int64_t o : {16, 32, 48, 64}) conv_case(2, 5, 4, 13, 3, 3, o, 1, 0, false);
  conv_case(1, 9, 9, 11, 32, 3, 64, 2, 0, false);
  conv_case(1, 5, 4, 9, 32, 3, 48, 1, 2, false);
  conv_case(1, 8, 7, 9, 2, 5, 32, 1, 0, true);
  conv_case(1, 6, 6, 30, 4, 3, 64, 2, 1, true);
  conv_case(1, 6, 5, 14, 32, 3, 64, 1, 1, true);  // kernel rows outermost (16-register targets), sparse, padded
  // Winograd tiles (3^3, >= 16 input channels, rows of >= 8 outputs): every channel group, dilations 1-3, tiles
  // cut by the output's end, sparse
  for (int64_t o : {16, 48, 64}) conv_case(2, 6, 7, 12, 16, 3, o, 1, 0, false);
  conv_case(1, 11, 10, 14, 32, 3, 64, 2, 0, false);
  conv_case(1, 11, 10, 14, 32, 3, 64, 2, 0, true);
  conv_case(1, 10, 12, 17, 32, 3, 32, 3, 0, true);
  for (int64_t o : {16, 48, 64}) gradient_case(o);
  head_case(13, 128, 3);
  head_case(7, 64, 2);
  pool_case(1);
  pool_case(2);
  nicms_case(11, 2);
  nicms_case(8, 3);
  if (failures) return 1;
  std::printf("ok %s\n", jaxcascade::kIsa);
  return 0;
}
