// One core, no XLA: jaxcascade's convolution kernel (run_rows of conv3d.cc, the file named by CONV_SOURCE) on
// one shape, timed `repeats` times after a warm-up call. benchmarks/kernel_core.py builds and runs it.
//
//   kernel_core N D H W C K O DILATION PAD SPARSE REPEATS
// prints: min_ms median_ms (one line). SPARSE 1 computes only the outputs in a centred ball of 40 % of the
// output's smallest edge in radius (the dense form's candidates cluster like that), zeros elsewhere.
#include CONV_SOURCE

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: kernel_core N D H W C K O DILATION PAD SPARSE REPEATS\n");
    return 2;
  }
  int64_t v[11];
  for (int i = 0; i < 11; ++i) v[i] = std::atoll(argv[i + 1]);
  const int64_t n = v[0], d = v[1], h = v[2], w = v[3], c = v[4], k = v[5], o = v[6], dilation = v[7], pad = v[8];
  const int64_t span = (k - 1) * dilation;
  jaxcascade::Geometry g{n, d, h, w, c, k, o, dilation, d + 2 * pad - span, h + 2 * pad - span, w + 2 * pad - span, pad};
  std::mt19937 random(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(n * d * h * w * c), kernel(k * k * k * c * o), y(n * g.od * g.oh * g.ow * o);
  for (float& value : x) value = normal(random);
  for (float& value : kernel) value = normal(random);
  std::vector<unsigned char> keep(n * g.od * g.oh * g.ow);
  const double radius = 0.4 * std::min({g.od, g.oh, g.ow});
  for (int64_t i = 0; i < static_cast<int64_t>(keep.size()); ++i) {
    const int64_t col = i % g.ow, row = (i / g.ow) % g.oh, z = (i / (g.ow * g.oh)) % g.od;
    const double dz = z - (g.od - 1) / 2.0, dy = row - (g.oh - 1) / 2.0, dx = col - (g.ow - 1) / 2.0;
    keep[i] = dz * dz + dy * dy + dx * dx <= radius * radius;
  }
  const bool* kept = v[9] ? reinterpret_cast<const bool*>(keep.data()) : nullptr;
  std::vector<double> seconds;
  for (int64_t repeat = 0; repeat <= v[10]; ++repeat) {  // the first call warms the caches and is not kept
    const auto start = std::chrono::steady_clock::now();
    jaxcascade::run_rows(g, x.data(), kernel.data(), y.data(), kept, 0, n * g.od * g.oh);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (repeat > 0) seconds.push_back(elapsed);
  }
  std::sort(seconds.begin(), seconds.end());
  std::printf("%.6f %.6f\n", seconds.front() * 1e3, seconds[seconds.size() / 2] * 1e3);
  return 0;
}
