// Winograd's minimal filtering F(2 x 2 x 2, 3 x 3 x 3) for 3^3 convolutions without padding, and the
// convolution geometry it shares with the direct kernel (conv3d.cc). nicMSlesions' patch kernel
// (nicms_features.cc) runs two of its layers through the same tiles.
#ifndef JAXCASCADE_KERNELS_WINOGRAD_H_
#define JAXCASCADE_KERNELS_WINOGRAD_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace jaxcascade {
namespace {

struct Geometry {
  int64_t n, d, h, w, c;       // input
  int64_t k, o, dilation;      // kernel
  int64_t od, oh, ow;          // output
  int64_t pad = 0;             // zeros before the input on each spatial axis (the output sizes say how many after)
};

// --- Winograd F(2, 3) for wide 3^3 layers over long rows ---------------------------------------------------
//
// The dense form's conv2 (32 -> 64 channels, dilation 2) is most of a study's time, and nicMSlesions' second
// layer (32 -> 32 over 10^3 outputs a patch) most of its network's. Winograd's minimal filtering
// F(2 x 2 x 2, 3 x 3 x 3) (Lavin & Gray 2016) computes a tile of 2^3 outputs, `dilation` apart, from 4^3
// inputs with 64 multiply-adds per input and output channel instead of 216: the tile's inputs and the kernel
// go through fixed linear maps (B, G), are multiplied position by position (64 GEMMs over the input channels,
// register-blocked as conv3d.cc's direct form), and the products go back through a third (A). The sums are
// reordered, so outputs differ from the direct form's by float32 rounding (off a float64 reference by 3e-7 of
// the largest output, the direct form by 1.4e-6); each tile is still summed by one thread in one fixed order,
// whatever the threads or the mask. conv3d.cc uses it where the kernel is 3^3 without padding, the input
// channels fill vectors (>= 16) and rows hold at least kWinogradMinWidth outputs (the dense form's blocks);
// the training and patch-wise shapes (2^3 outputs) keep the direct form. nicms_features.cc uses it for the
// layers of its patches whose outputs fill whole tiles.
constexpr int64_t kWinogradMinWidth = 8;
constexpr int kTileCap = 24;  // tiles per GEMM pass: their inputs, products and one position's weights in L2
// Floats between two positions' inputs (products): kTileCap tiles and one cache line more, so that a tile's 64
// positions fall in 64 different sets of L1, not in the 2-4 sets a multiple of 4 KB would share.
inline int64_t position_stride(int64_t channels) { return kTileCap * channels + 16; }

bool winograd_applies(const Geometry& g) {
  return g.k == 3 && g.pad == 0 && g.c >= 16 && g.c % kLanes == 0 && g.ow >= kWinogradMinWidth;
}

// The tile bases along an axis of `extent` outputs: q with q mod 2d < d; the tile is {q, q + d}.
inline int64_t tile_count(int64_t extent, int64_t d) { return (extent / (2 * d)) * d + std::min(d, extent % (2 * d)); }
inline int64_t tile_base(int64_t i, int64_t d) { return (i / d) * 2 * d + i % d; }

// B^T along one axis of 4 values, `stride` apart: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
template <typename T>
inline void input_map(T* v, int stride) {
  const T d0 = v[0], d1 = v[stride], d2 = v[2 * stride], d3 = v[3 * stride];
  v[0] = d0 - d2;
  v[stride] = d1 + d2;
  v[2 * stride] = d2 - d1;
  v[3 * stride] = d1 - d3;
}

// U[xi][ci][o] = (G g G^T)[xi] for each (ci, o): G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1] on each axis.
void transform_weights(const Geometry& g, const float* w, float* u) {
  const int64_t co = g.c * g.o;
  std::vector<float> t1(4 * 9 * co), t2(16 * 3 * co);
  auto g_map = [co](const float* in, int64_t in_stride, float* out, int64_t out_stride) {
    for (int64_t j = 0; j < co; ++j) {
      const float g0 = in[j], g1 = in[in_stride + j], g2 = in[2 * in_stride + j];
      out[j] = g0;
      out[out_stride + j] = (g0 + g1 + g2) * 0.5f;
      out[2 * out_stride + j] = (g0 - g1 + g2) * 0.5f;
      out[3 * out_stride + j] = g2;
    }
  };
  for (int64_t bc = 0; bc < 9; ++bc) g_map(w + bc * co, 9 * co, t1.data() + bc * co, 9 * co);  // along a
  for (int64_t a = 0; a < 4; ++a)
    for (int64_t c = 0; c < 3; ++c)
      g_map(t1.data() + (a * 9 + c) * co, 3 * co, t2.data() + (a * 12 + c) * co, 3 * co);     // along b
  for (int64_t ab = 0; ab < 16; ++ab) g_map(t2.data() + ab * 3 * co, co, u + ab * 4 * co, co);  // along c
}

struct Tile {
  int64_t batch, z, y, x;  // the example and the tile's first output
};

// V[xi][slot][ci] for one tile: its 4^3 inputs (zeros past the input's end), B^T along each axis.
void transform_input(const Geometry& g, const float* x, const Tile& t, float* v, int slot) {
  const int64_t d = g.dilation, sh = g.w * g.c, sd = g.h * sh;
  int extent[3];
  const int64_t first[3] = {t.z, t.y, t.x}, size[3] = {g.d, g.h, g.w};
  for (int axis = 0; axis < 3; ++axis) {
    int n = 0;
    while (n < 4 && first[axis] + n * d < size[axis]) ++n;
    extent[axis] = n;
  }
  const float* base = x + t.batch * g.d * sd + t.z * sd + t.y * sh + t.x * g.c;
  for (int64_t cv = 0; cv < g.c; cv += kLanes) {
    vec in[64];
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b)
        for (int e = 0; e < 4; ++e)
          in[(a * 4 + b) * 4 + e] = a < extent[0] && b < extent[1] && e < extent[2]
                                        ? load(base + (a * sd + b * sh + e * g.c) * d + cv) : vec{};
    for (int ab = 0; ab < 16; ++ab) input_map(in + ab * 4, 1);
    for (int a = 0; a < 4; ++a)
      for (int e = 0; e < 4; ++e) input_map(in + a * 16 + e, 4);
    for (int be = 0; be < 16; ++be) input_map(in + be, 16);
    for (int xi = 0; xi < 64; ++xi) store(v + xi * position_stride(g.c) + slot * g.c + cv, in[xi]);
  }
}

// M[xi][slot][o] = sum over ci of V[xi][slot][ci] U[xi][ci][o], for `tiles` slots: R slots x NV vectors of
// channels in registers, as multiply_add does for the direct form.
template <int NV, int R>
void position_products(const Geometry& g, const float* v, const float* u, float* m, int first, int count,
                       int64_t channel) {
  if constexpr (R > 0) {
    if (count < R) return position_products<NV, R - 1>(g, v, u, m, first, count, channel);
    vec acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = vec{};
    const float* vs = v + first * g.c;
    for (int64_t ci = 0; ci < g.c; ++ci) multiply_add<NV, R>(acc, vs + ci, g.c, u + ci * g.o + channel);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) store(m + (first + r) * g.o + channel + kLanes * j, acc[r][j]);
  }
}

template <int NV>
void all_products(const Geometry& g, const float* v, const float* u, float* m, int tiles) {
  constexpr int R = block_outputs(NV);
  for (int xi = 0; xi < 64; ++xi) {
    const float* vx = v + xi * position_stride(g.c);
    const float* ux = u + xi * g.c * g.o;
    float* mx = m + xi * position_stride(g.o);
    for (int64_t channel = 0; channel < g.o; channel += NV * kLanes)
      for (int first = 0; first < tiles; first += R)
        position_products<NV, R>(g, vx, ux, mx, first, std::min(R, tiles - first), channel);
  }
}

// A^T = [1 1 1 0; 0 1 -1 -1] along each axis: the tile's 2^3 outputs, written where kept and inside.
void transform_output(const Geometry& g, const float* m, float* y, const bool* keep, const Tile& t, int slot) {
  const int64_t d = g.dilation;
  for (int64_t cv = 0; cv < g.o; cv += kLanes) {
    vec p[64];
    for (int xi = 0; xi < 64; ++xi) p[xi] = load(m + xi * position_stride(g.o) + slot * g.o + cv);
    vec q[32];  // along c: 4 x 4 x 2
    for (int ab = 0; ab < 16; ++ab) {
      q[ab * 2] = p[ab * 4] + p[ab * 4 + 1] + p[ab * 4 + 2];
      q[ab * 2 + 1] = p[ab * 4 + 1] - p[ab * 4 + 2] - p[ab * 4 + 3];
    }
    vec r[16];  // along b: 4 x 2 x 2
    for (int a = 0; a < 4; ++a)
      for (int e = 0; e < 2; ++e) {
        const vec* s = q + a * 8 + e;
        r[a * 4 + e] = s[0] + s[2] + s[4];
        r[a * 4 + 2 + e] = s[2] - s[4] - s[6];
      }
    for (int be = 0; be < 4; ++be) {  // along a, and out
      const vec out[2] = {r[be] + r[4 + be] + r[8 + be], r[4 + be] - r[8 + be] - r[12 + be]};
      for (int i = 0; i < 2; ++i) {
        const int64_t z = t.z + i * d, yy = t.y + (be / 2) * d, xx = t.x + (be % 2) * d;
        if (z >= g.od || yy >= g.oh || xx >= g.ow) continue;
        const int64_t index = ((t.batch * g.od + z) * g.oh + yy) * g.ow + xx;
        if (keep && !keep[index]) continue;
        store(y + index * g.o + cv, out[i]);
      }
    }
  }
}

// A thread's tile inputs and products (0.6 MB for 32 -> 64 channels), kept for its next task: a fresh zeroed
// buffer per task would cost about as much as the weights' transform. Only the slots a pass fills are read.
float* scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

template <int NV>
void winograd_rows(const Geometry& g, const float* x, const float* u, float* y, const bool* keep, int64_t first,
                   int64_t last) {
  const int64_t d = g.dilation, tz = tile_count(g.od, d), ty = tile_count(g.oh, d), tx = tile_count(g.ow, d);
  float* const v = scratch(64 * (position_stride(g.c) + position_stride(g.o)));
  float* const m = v + 64 * position_stride(g.c);
  Tile tiles[kTileCap];
  int count = 0;
  auto flush = [&] {
    all_products<NV>(g, v, u, m, count);
    for (int s = 0; s < count; ++s) transform_output(g, m, y, keep, tiles[s], s);
    count = 0;
  };
  for (int64_t index = first; index < last; ++index) {
    const int64_t batch = index / (tz * ty), z = tile_base((index / ty) % tz, d), row = tile_base(index % ty, d);
    // With a mask, the tile row's output rows start as zeros and kept outputs are written below; without
    // one, the tiles write every output.
    for (int i = 0; i < 2 && keep; ++i)
      for (int j = 0; j < 2; ++j)
        if (z + i * d < g.od && row + j * d < g.oh) {
          float* out = y + (((batch * g.od + z + i * d) * g.oh + row + j * d) * g.ow) * g.o;
          std::fill(out, out + g.ow * g.o, 0.0f);
        }
    for (int64_t i = 0; i < tx; ++i) {
      const Tile t{batch, z, row, tile_base(i, d)};
      if (keep) {
        bool any = false;
        for (int a = 0; a < 2 && !any; ++a)
          for (int b = 0; b < 2 && !any; ++b)
            for (int e = 0; e < 2 && !any; ++e) {
              const int64_t zz = t.z + a * d, yy = t.y + b * d, xx = t.x + e * d;
              any = zz < g.od && yy < g.oh && xx < g.ow && keep[((batch * g.od + zz) * g.oh + yy) * g.ow + xx];
            }
        if (!any) continue;
      }
      transform_input(g, x, t, v, count);
      tiles[count++] = t;
      if (count == kTileCap) flush();
    }
  }
  if (count) flush();
}

// Rows of tiles: each covers the output rows z, z + d and y, y + d of one example.
int64_t tile_rows(const Geometry& g) { return g.n * tile_count(g.od, g.dilation) * tile_count(g.oh, g.dilation); }

// Tile rows [first, last) from the transformed weights u (transform_weights), for a 3^3 kernel without padding
// over at least 16 input channels, a multiple of kLanes (winograd_applies says where conv3d.cc runs them).
void run_tile_rows(const Geometry& g, const float* x, const float* u, float* y, const bool* keep, int64_t first,
                   int64_t last) {
  switch (group_vectors(g.o / kLanes)) {
    case 1: winograd_rows<1>(g, x, u, y, keep, first, last); break;
    case 2: winograd_rows<2>(g, x, u, y, keep, first, last); break;
    case 3: winograd_rows<3>(g, x, u, y, keep, first, last); break;
    default: winograd_rows<4>(g, x, u, y, keep, first, last); break;
  }
}

}  // namespace
}  // namespace jaxcascade

#endif  // JAXCASCADE_KERNELS_WINOGRAD_H_
