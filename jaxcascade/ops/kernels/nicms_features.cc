// nicMSlesions' convolutional layers, one patch at a time, in one call (ops/patch_features.py).
//
// nicMSlesions' network (networks/nicms.py) has no dense form: SAME padding and a PReLU slope per position.
// Run layer by layer, every layer's activations of a batch of patches (13^3 x 32 floats a patch) go to
// memory and back through XLA's batch-norm, PReLU, pad and pool passes. Here a thread takes one patch
// through the whole stack, its activations (~0.6 MB for 11^3 patches) staying in its L2 cache:
//   conv 3^3 SAME (C -> 32), affine, PReLU; conv (32 -> 32), affine, PReLU; max-pool 2;
//   conv (32 -> 64), affine, PReLU; conv (64 -> 64), affine, PReLU; max-pool 2
// ("affine": the convolution's bias and the inference batch norm, as one scale and shift per channel).
// The pools keep the first 2 * (size / 2) planes of each axis (Keras' 'valid'), so the convolutions before
// them compute only those outputs (for 11^3 patches 10^3 of 11^3 and 4^3 of 5^3: a quarter fewer
// multiply-adds, the same result). Taps that read the zero padding are skipped plane by plane.
//
// Layouts, channels-last and C-contiguous float32: x (N, P, P, P, C); kernels (3, 3, 3, in, out); scales and
// shifts (out); slopes (S, S, S, out) for a layer over S^3 positions; y (N, R, R, R, 64), R = (P / 2) / 2.
// Each output is summed by one thread in a fixed order (taps a, b, c, then input channels; the Winograd
// tiles' order for the layers that run as tiles, below), so results do not depend on the thread count.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "winograd.h"

namespace jaxcascade {
namespace {

struct Layer {
  const float* kernel;  // (3, 3, 3, in, out)
  const float* scale;   // (out)
  const float* shift;   // (out)
  const float* slope;   // (size, size, size, out)
  int64_t size, in, out;
};

// One patch's activations, each layer's input with a border of zeros (the SAME padding, never written).
struct Scratch {
  std::vector<float> input, conv1, conv2, pool1, conv3, conv4;
  int64_t patch = -1, channels = -1;

  void fit(int64_t p, int64_t c) {
    if (p == patch && c == channels) return;
    const int64_t q = p / 2, s = p + 2, t = q + 2;
    input.assign(s * s * s * c, 0.0f);
    conv1.assign(s * s * s * 32, 0.0f);
    conv2.assign(8 * q * q * q * 32, 0.0f);
    pool1.assign(t * t * t * 32, 0.0f);
    conv3.assign(t * t * t * 64, 0.0f);
    conv4.assign(8 * (q / 2) * (q / 2) * (q / 2) * 64, 0.0f);
    patch = p;
    channels = c;
  }
};

// acc[r][v] += xs[at[r]] * w[v * kLanes]: simd.h's multiply_add for outputs at any offsets (a block across
// rows), the inputs broadcast first or not as BroadcastFirst says. Written apart so that the convolution
// kernels' own (conv3d.cc) compile to the same instructions as before this kernel existed.
template <int NV, int R, bool BroadcastFirst>
inline void multiply_add_at(vec (&acc)[R][NV], const float* xs, const int64_t (&at)[R], const float* w) {
  if constexpr (BroadcastFirst) {
    vec s[R];
    for (int r = 0; r < R; ++r) s[r] = splat(xs[at[r]]);
    for (int v = 0; v < NV; ++v) {
      vec wv = load(w + kLanes * v);
      in_register(wv);
      for (int r = 0; r < R; ++r) acc[r][v] += s[r] * wv;
    }
  } else {
    vec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(w + kLanes * v);
    for (int r = 0; r < R; ++r) {
      const float s = xs[at[r]];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * wv[v];
    }
  }
}

// A layer's affine and PReLU on one vector of channels of an output's sum: `channel` and `slope` (that
// position's slopes) already offset to the vector.
inline vec affine_prelu(const Layer& L, vec sum, int64_t channel, const float* slope) {
  const vec value = sum * load(L.scale + channel) + load(L.shift + channel);
  return value > 0 ? value : value * load(slope);
}

// R outputs of plane z, at the positions [k, k + R) of its count x count outputs in row order, channels
// [channel, channel + NV * kLanes): the convolution over the padded input `in` ((size + 2)^3 x in channels),
// then the affine and the PReLU, stored into `out` (an edge^3 grid with `offset` planes of border before the
// outputs). A block may span rows (layer_outputs says when); within one row it skips the padding rows' taps.
template <int NV, int R>
inline void block(const Layer& L, const float* in, float* out, int64_t edge, int64_t offset, int64_t z,
                  int64_t k, int64_t count, int64_t channel) {
  // The R inputs broadcast into registers first wherever they fit beside the accumulators and a weight: with
  // AVX-512's 32 registers too, where it ran 64-channel rows of 4 outputs 1.8x faster (kBroadcastFirst: why).
  constexpr bool kFirst = kBroadcastFirst || NV * R + R + 1 <= kRegisters;
  const int64_t side = L.size + 2, run = 3 * L.in;
  const int64_t row = k / count;
  const bool one_row = (k + R - 1) / count == row;
  int64_t at[R];  // each output's first input, from the start of its plane's first tap row
  for (int r = 0; r < R; ++r) at[r] = (((k + r) / count) * side + (k + r) % count) * L.in;
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
  for (int64_t a = 0; a < 3; ++a) {
    const int64_t zi = z + a;
    if (zi == 0 || zi == side - 1) continue;  // a plane of padding
    for (int64_t b = 0; b < 3; ++b) {
      if (one_row && (row + b == 0 || row + b == side - 1)) continue;  // a row of padding
      // The taps (c, ci) of one row are one contiguous run in the input and in the kernel.
      const float* xt = in + (zi * side + b) * side * L.in;
      const float* wt = L.kernel + (a * 3 + b) * run * L.out + channel;
      for (int64_t j = 0; j < run; ++j) multiply_add_at<NV, R, kFirst>(acc, xt + j, at, wt + j * L.out);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t y = (k + r) / count, x = (k + r) % count;
    const float* slope = L.slope + ((z * L.size + y) * L.size + x) * L.out + channel;
    float* target = out + (((z + offset) * edge + y + offset) * edge + x + offset) * L.out + channel;
    for (int v = 0; v < NV; ++v)
      store(target + kLanes * v, affine_prelu(L, acc[r][v], channel + kLanes * v, slope + kLanes * v));
  }
}

template <int NV, int R>
inline void block_of(const Layer& L, const float* in, float* out, int64_t edge, int64_t offset, int64_t z,
                     int64_t k, int64_t count, int64_t width) {
  if constexpr (R > 0) {
    if (width == R) {
      for (int64_t channel = 0; channel < L.out; channel += NV * kLanes)
        block<NV, R>(L, in, out, edge, offset, z, k, count, channel);
    } else {
      block_of<NV, R - 1>(L, in, out, edge, offset, z, k, count, width);
    }
  }
}

// The layer's first `count` outputs along each axis. Where a row fits one block (AVX-512), a block is a row;
// otherwise each plane's outputs, in row order, go in as few blocks of as equal widths as fit, across rows
// (AVX2: 3 outputs a block, and 100 outputs of a 10 x 10 plane as 32 blocks of 3 and 2 of 2, where rows cut
// them into 3, 3, 2, 2: 21 % faster over the four layers on Zen 4, 33 % on the 64-channel ones).
template <int NV>
void layer_outputs(const Layer& L, const float* in, float* out, int64_t edge, int64_t offset, int64_t count) {
  constexpr int R = block_outputs(NV);  // simd.h
  const int64_t total = count * count, blocks = count <= R ? count : (total + R - 1) / R;
  for (int64_t z = 0; z < count; ++z)
    for (int64_t i = 0, k = 0; i < blocks; ++i) {
      const int64_t width = (total - k + blocks - i - 1) / (blocks - i);
      block_of<NV, R>(L, in, out, edge, offset, z, k, count, width);
      k += width;
    }
}

// The layers whose outputs start at the origin of an even-sized grid (the second and fourth: 10^3 and 4^3
// outputs for 11^3 patches, the second most of the network's multiply-adds) as Winograd tiles of 2^3 outputs
// (winograd.h): 64 multiply-adds per tile, input and output channel instead of 216. The padded input is a
// VALID convolution's input; u holds the layer's transformed weights. Then the affine and the PReLU.
Geometry tiled_geometry(const Layer& L, int64_t count) {
  const int64_t side = L.size + 2;
  return Geometry{1, side, side, side, L.in, 3, L.out, 1, count, count, count, 0};
}

bool runs_as_tiles(const Layer& L, int64_t offset, int64_t count) {
  return offset == 0 && count % 2 == 0 && L.in % kLanes == 0 && L.in >= 16;
}

void tiled_layer(const Layer& L, const float* u, const float* in, float* out, int64_t count) {
  const Geometry g = tiled_geometry(L, count);
  run_tile_rows(g, in, u, out, nullptr, 0, tile_rows(g));
  for (int64_t z = 0; z < count; ++z)
    for (int64_t y = 0; y < count; ++y)
      for (int64_t x = 0; x < count; ++x) {
        float* target = out + ((z * count + y) * count + x) * L.out;
        const float* slope = L.slope + ((z * L.size + y) * L.size + x) * L.out;
        for (int64_t channel = 0; channel < L.out; channel += kLanes)
          store(target + channel, affine_prelu(L, load(target + channel), channel, slope + channel));
      }
}

void convolve(const Layer& L, const float* in, float* out, int64_t edge, int64_t offset, int64_t count) {
  switch (group_vectors(L.out / kLanes)) {  // 32 or 64 channels
    case 1: layer_outputs<1>(L, in, out, edge, offset, count); break;
    case 2: layer_outputs<2>(L, in, out, edge, offset, count); break;
    case 3: layer_outputs<3>(L, in, out, edge, offset, count); break;
    default: layer_outputs<4>(L, in, out, edge, offset, count); break;
  }
}

// The 2^3 max-pool, stride 2, of a (2n)^3 x channels grid into an edge^3 grid from `offset` on.
void pool(const float* in, int64_t n, int64_t channels, float* out, int64_t edge, int64_t offset) {
  const int64_t side = 2 * n;
  for (int64_t z = 0; z < n; ++z)
    for (int64_t y = 0; y < n; ++y)
      for (int64_t x = 0; x < n; ++x) {
        float* target = out + (((z + offset) * edge + y + offset) * edge + x + offset) * channels;
        for (int64_t c = 0; c < channels; c += kLanes) {
          vec best = load(in + ((2 * z * side + 2 * y) * side + 2 * x) * channels + c);
          for (int64_t a = 0; a < 2; ++a)
            for (int64_t b = 0; b < 2; ++b)
              for (int64_t d = 0; d < 2; ++d) {
                const vec v = load(in + (((2 * z + a) * side + 2 * y + b) * side + 2 * x + d) * channels + c);
                best = v > best ? v : best;
              }
          store(target + c, best);
        }
      }
}

// A layer through Winograd tiles (its transformed weights in u) where it runs as tiles, the direct form otherwise.
void layer(const Layer& L, const float* u, const float* in, float* out, int64_t edge, int64_t offset,
           int64_t count) {
  if (u != nullptr)
    tiled_layer(L, u, in, out, count);
  else
    convolve(L, in, out, edge, offset, count);
}

// The layers that run as tiles, their weights transformed once a call (0.2 ms for both, less than one patch
// takes): u[i] for layer i, nullptr where it runs in the direct form.
struct TiledLayers {
  std::vector<float> weights[4];
  const float* u[4] = {nullptr, nullptr, nullptr, nullptr};

  explicit TiledLayers(const Layer (&layers)[4]) {
    const int64_t p = layers[0].size, q = p / 2, r = q / 2;
    const int64_t offsets[4] = {1, 0, 1, 0}, counts[4] = {p, 2 * q, q, 2 * r};
    for (int i = 0; i < 4; ++i) {
      if (!runs_as_tiles(layers[i], offsets[i], counts[i])) continue;
      weights[i].resize(64 * layers[i].in * layers[i].out);
      transform_weights(tiled_geometry(layers[i], counts[i]), layers[i].kernel, weights[i].data());
      u[i] = weights[i].data();
    }
  }
};

// One patch through the four layers into its pooled features; u: TiledLayers::u.
void one_patch(const Layer (&layers)[4], const float* const (&u)[4], const float* patch, float* features,
               Scratch& s) {
  const int64_t p = layers[0].size, c = layers[0].in, q = p / 2, r = q / 2;
  const int64_t side = p + 2;
  for (int64_t z = 0; z < p; ++z)
    for (int64_t y = 0; y < p; ++y)
      std::memcpy(&s.input[(((z + 1) * side + y + 1) * side + 1) * c], patch + (z * p + y) * p * c,
                  p * c * sizeof(float));
  layer(layers[0], u[0], s.input.data(), s.conv1.data(), side, 1, p);
  layer(layers[1], u[1], s.conv1.data(), s.conv2.data(), 2 * q, 0, 2 * q);
  pool(s.conv2.data(), q, 32, s.pool1.data(), q + 2, 1);
  layer(layers[2], u[2], s.pool1.data(), s.conv3.data(), q + 2, 1, q);
  layer(layers[3], u[3], s.conv3.data(), s.conv4.data(), 2 * r, 0, 2 * r);
  pool(s.conv4.data(), r, 64, features, r, 0);
}

ffi::Error FeaturesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k1,
                        ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> t1, ffi::Buffer<ffi::F32> a1,
                        ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> t2,
                        ffi::Buffer<ffi::F32> a2, ffi::Buffer<ffi::F32> k3, ffi::Buffer<ffi::F32> s3,
                        ffi::Buffer<ffi::F32> t3, ffi::Buffer<ffi::F32> a3, ffi::Buffer<ffi::F32> k4,
                        ffi::Buffer<ffi::F32> s4, ffi::Buffer<ffi::F32> t4, ffi::Buffer<ffi::F32> a4,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 5 || yd.size() != 5) return ffi::Error::InvalidArgument("nicms features: rank 5 expected");
  const int64_t n = xd[0], p = xd[1], c = xd[4], q = p / 2, r = q / 2;
  const int64_t sizes[4] = {p, p, q, q}, ins[4] = {c, 32, 32, 64}, outs[4] = {32, 32, 64, 64};
  ffi::Buffer<ffi::F32>* parts[4][4] = {{&k1, &s1, &t1, &a1}, {&k2, &s2, &t2, &a2}, {&k3, &s3, &t3, &a3},
                                        {&k4, &s4, &t4, &a4}};
  bool consistent = xd[2] == p && xd[3] == p && r > 0 && c > 0 && yd[0] == n && yd[1] == r && yd[2] == r &&
                    yd[3] == r && yd[4] == 64;
  Layer layers[4];
  for (int i = 0; i < 4 && consistent; ++i) {
    auto kd = parts[i][0]->dimensions(), ad = parts[i][3]->dimensions();
    const int64_t o = outs[i], s = sizes[i];
    consistent = kd.size() == 5 && kd[0] == 3 && kd[1] == 3 && kd[2] == 3 && kd[3] == ins[i] && kd[4] == o &&
                 parts[i][1]->element_count() == o && parts[i][2]->element_count() == o && ad.size() == 4 &&
                 ad[0] == s && ad[1] == s && ad[2] == s && ad[3] == o;
    layers[i] = {parts[i][0]->typed_data(), parts[i][1]->typed_data(), parts[i][2]->typed_data(),
                 parts[i][3]->typed_data(), s, ins[i], o};
  }
  if (!consistent) return ffi::Error::InvalidArgument("nicms features: inconsistent shapes");
  const TiledLayers tiled(layers);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t patch_floats = p * p * p * c, feature_floats = r * r * r * 64;
  run_tasks(pool, n, [&layers, &tiled, xp, yp, p, c, patch_floats, feature_floats](int64_t i) {
    thread_local Scratch scratch;  // the pool's threads live on: allocated once per shape
    scratch.fit(p, c);
    one_patch(layers, tiled.u, xp + i * patch_floats, yp + i * feature_floats, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxcascade

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcascadeNicmsFeatures, jaxcascade::FeaturesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // patches
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv1_1: kernel, scale, shift, slopes
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv1_2
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv2_1
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv2_2
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
