// crossdraft's CPU kernel for y = x W^T + b with few rows (decoding) or many (prefill), float32.
//
// Owns: `rows_pack` (W [N, K] -> panels [ceil(N / COLS), K, COLS], zero-padded) and `rows_linear`
// (y [M, N] from x [M, K] and the panels). Each output is one FMA chain over k = 0 .. K-1 from zero,
// then + b: the same arithmetic whatever the number of rows, the rows' neighbours, the thread count or
// the instruction set (AVX-512 and AVX2 round each FMA alike). So a sequence's logits do not depend
// on which sequences share its pass (each attends over its own cache on its own).
// Weights that are bfloat16 values (a checkpoint stored in bfloat16, loaded as float32) may be packed in
// bfloat16 instead (`rows_pack_bf16`): each is widened to its float32 value, exactly, before its FMA, so
// the outputs are the float32 panels' bit for bit, and a decoding step reads half the bytes. Widening is
// one load, a shift and a mask per k (the panel's columns are stored in the order they come out), so a
// tile of many rows costs little more than over float32 panels.
//
// Why: a decoding step reads every weight once per pass. A panel (COLS outputs x all of K) streams
// from memory once and stays in L2 while every tile of up to ROWS rows multiplies it, ROWS x 2 vector
// accumulators in registers. One row runs at the memory's speed, eight at about the core's FMA peak.
// No software prefetch: the hardware prefetcher follows the panel's one stream better (measured).
//
// Never: allocates more than its output, or keeps state between calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "vec.h"

namespace {

#if defined(__AVX512F__)
constexpr int ROWS = 8;  // 2 x 8 accumulators of 32 registers
#else
constexpr int ROWS = 6;  // 2 x 6 accumulators of 16 registers
#endif

constexpr int64_t COLS = 2 * LANES;  // outputs per panel

// A panel's k-th row of weights as float32 vectors: columns 0 .. LANES-1 and LANES .. COLS-1.
inline void wload(const float* p, vec& w0, vec& w1) { w0 = vload(p); w1 = vload(p + LANES); }
// bfloat16, in `bf16_column`'s order: each 32-bit word of the row holds column j in its lower half and
// column LANES + j in its upper half; a bfloat16 in the upper half of a 32-bit lane is its float32 value,
// so a shift and a mask widen both (AVX-512F and AVX2 alike).
inline void wload(const uint16_t* p, vec& w0, vec& w1) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_loadu_si512(p);
  w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  w1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
#else
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#endif
}

// The column a bfloat16 panel row stores at word p (see wload): j = p / 2 of w0 for even p, of w1 for odd.
constexpr int64_t bf16_column(int64_t p) { return (p % 2 ? LANES : 0) + p / 2; }

// R rows of x times one panel (float32 or bfloat16 weights, T): out[r][0 .. COLS) (+ bias), rows r < R.
template <int R, typename T>
void tile(const float* x, int64_t K, const T* panel, const float* bias, float* out, int64_t ld_out) {
  vec lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vec w0, w1;
    wload(panel + k * COLS, w0, w1);
    for (int r = 0; r < R; ++r) {
      const vec xv = vset(x[r * K + k]);
      lo[r] = vfma(xv, w0, lo[r]);
      hi[r] = vfma(xv, w1, hi[r]);
    }
  }
  const vec b0 = bias ? vload(bias) : vzero(), b1 = bias ? vload(bias + LANES) : vzero();
  for (int r = 0; r < R; ++r) {
    vstore(out + r * ld_out, bias ? vadd(lo[r], b0) : lo[r]);
    vstore(out + r * ld_out + LANES, bias ? vadd(hi[r], b1) : hi[r]);
  }
}

template <typename T>
using TileFn = void (*)(const float*, int64_t, const T*, const float*, float*, int64_t);

template <typename T, int... R>
constexpr auto make_tiles(std::integer_sequence<int, R...>) {
  return std::array<TileFn<T>, sizeof...(R)>{tile<R + 1, T>...};
}
template <typename T>
constexpr auto TILES = make_tiles<T>(std::make_integer_sequence<int, ROWS>{});

at::Tensor rows_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(),
              "rows_pack: a float32 CPU matrix [N, K]");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + COLS - 1) / COLS;
  auto padded = at::zeros({panels * COLS, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, COLS, K}).transpose(1, 2).contiguous();  // [panels, K, COLS]
}

// W's panels in bfloat16, each row's columns in `bf16_column`'s order; W must hold bfloat16 values.
// Written straight from W (no float32 panels on the way): the upper 16 bits of each float32 are its value.
at::Tensor rows_pack_bf16(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kFloat && w_in.device().is_cpu(),
              "rows_pack_bf16: a float32 CPU matrix [N, K]");
  const auto w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), panels = (N + COLS - 1) / COLS;
  auto out = at::zeros({panels, K, COLS}, w.options().dtype(at::kBFloat16));
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<float>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  std::array<int64_t, COLS> word;  // the word of a panel row that holds column c
  for (int64_t p = 0; p < COLS; ++p) word[bf16_column(p)] = p;
  for (int64_t n = 0; n < N; ++n) {
    uint16_t* panel = dst + (n / COLS) * K * COLS + word[n % COLS];
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t bits = src[n * K + k];
      TORCH_CHECK((bits & 0xFFFFu) == 0,
                  "rows_pack_bf16: the weights are not all bfloat16 values (pack them with rows_pack)");
      panel[k * COLS] = static_cast<uint16_t>(bits >> 16);
    }
  }
  return out;
}

// One panel for every row of x, ROWS rows at a time; a last partial panel goes through a scratch tile.
template <typename T>
void panel_rows(const float* x, int64_t M, int64_t K, const T* panel, const float* bias, float* y, int64_t N,
                int64_t col) {
  const int64_t width = std::min<int64_t>(COLS, N - col);
  float scratch[ROWS * COLS], bias_pad[COLS];
  const float* b = nullptr;
  if (bias) {
    std::memset(bias_pad, 0, sizeof bias_pad);
    std::memcpy(bias_pad, bias + col, width * sizeof(float));
    b = bias_pad;
  }
  for (int64_t m = 0; m < M; m += ROWS) {
    const int r = static_cast<int>(std::min<int64_t>(ROWS, M - m));
    if (width == COLS) {
      TILES<T>[r - 1](x + m * K, K, panel, b, y + m * N + col, N);
    } else {
      TILES<T>[r - 1](x + m * K, K, panel, b, scratch, COLS);
      for (int i = 0; i < r; ++i) std::memcpy(y + (m + i) * N + col, scratch + i * COLS, width * sizeof(float));
    }
  }
}

at::Tensor rows_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& b_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "rows_linear: x must be a float32 CPU matrix [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == COLS && packed.size(1) == x_in.size(1) &&
                  packed.size(0) * COLS >= N && (packed.size(0) - 1) * COLS < N,
              "rows_linear: packed weights do not match x [M, K] and N (pack them with rows_pack)");
  const bool bf16 = packed.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || packed.scalar_type() == at::kFloat,
              "rows_linear: packed weights are float32 (rows_pack) or bfloat16 (rows_pack_bf16)");
  const auto x = x_in.contiguous();
  const auto packed_c = packed.contiguous();
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0);
  c10::optional<at::Tensor> b;
  if (b_in.has_value()) {
    b = b_in->contiguous();
    TORCH_CHECK(b->numel() == N && b->scalar_type() == at::kFloat, "rows_linear: bias must be float32 [N]");
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* wp) {
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) panel_rows(xp, M, K, wp + p * K * COLS, bp, yp, N, p * COLS);
    });
  };
  if (bf16) {
    run(reinterpret_cast<const uint16_t*>(packed_c.data_ptr<at::BFloat16>()));
  } else {
    run(packed_c.data_ptr<float>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(crossdraft, m) {
  m.def("rows_pack(Tensor w) -> Tensor");
  m.def("rows_pack_bf16(Tensor w) -> Tensor");
  m.def("rows_linear(Tensor x, Tensor packed, int n, Tensor? b) -> Tensor");
}

TORCH_LIBRARY_IMPL(crossdraft, CPU, m) {
  m.impl("rows_pack", rows_pack);
  m.impl("rows_pack_bf16", rows_pack_bf16);
  m.impl("rows_linear", rows_linear);
}
