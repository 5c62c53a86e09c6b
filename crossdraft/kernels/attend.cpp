// crossdraft's CPU kernel for decoding steps' attention, float32: `decode_attend`.
//
// Owns: for each sequence b of a pass whose step is a short causal block (one token: a target or drafter
// step; a few: a verification), writing its ns[b] new keys and values at positions starts[b].. of its
// own cache, then each row's attention over that cache up to its own position, every head at once:
// out [rows, H, D]. Each (row, head) is computed alone, in a fixed order (scores, max, exp and sum, then
// the weighted values position by position), so its bits depend on nothing else in the pass, nor on the
// block it came in: a verification's row gives what the same token as a one-token step gives.
//
// Why: the layers' Python-free loop (crossdraft/fused.py) spends about ten operators per sequence and
// layer on a decoding step's attention (cache writes, two batched matrix products, softmax, copies);
// with 8 sequences of 250 positions that is about 500 operators and 30% of a pass. Here it is one call
// per layer. A prompt's long block stays with torch's matrix products (runner.DECODE_ROWS), which do
// its rows together.
//
// Never: allocates more than its output and a score buffer, or keeps state between calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float sum = 0.f;
  if (D >= LANES) {
    vec acc = vzero();
    for (; d + LANES <= D; d += LANES) acc = vfma(vload(a + d), vload(b + d), acc);
    float lanes[LANES];
    vstore(lanes, acc);
    for (int64_t i = 0; i < LANES; ++i) sum += lanes[i];
  }
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// One head of one sequence: out[0 .. D) from q[0 .. D) over keys/values [0, end) (rows of D floats).
void head(const float* q, const float* K, const float* V, int64_t end, int64_t D, float scale, float* out,
          std::vector<float>& s) {
  s.resize(end);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p < end; ++p) {
    s[p] = dot(q, K + p * D, D) * scale;
    m = std::max(m, s[p]);
  }
  float total = 0.f;
  for (int64_t p = 0; p < end; ++p) {
    s[p] = std::exp(s[p] - m);
    total += s[p];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  int64_t vd = D / LANES * LANES;
  for (int64_t p = 0; p < end; ++p) {
    const float* v = V + p * D;
    const vec w = vset(s[p]);
    for (int64_t d = 0; d < vd; d += LANES) vstore(out + d, vfma(w, vload(v + d), vload(out + d)));
    for (int64_t d = vd; d < D; ++d) out[d] += s[p] * v[d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= total;
}

at::Tensor decode_attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         at::TensorList kcs, at::TensorList vcs, int64_t layer, at::IntArrayRef starts,
                         at::IntArrayRef ns, double scaling) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat && q_in.device().is_cpu(),
              "decode_attend: q must be float32 CPU [N, H, D]");
  const int64_t N = q_in.size(0), H = q_in.size(1), D = q_in.size(2), B = (int64_t)starts.size();
  TORCH_CHECK(k_in.dim() == 3 && k_in.sizes() == v_in.sizes() && k_in.size(0) == N && k_in.size(2) == D &&
                  k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "decode_attend: k and v must be float32 [N, KV, D]");
  const int64_t KV = k_in.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0, "decode_attend: heads must be a multiple of key-value heads");
  TORCH_CHECK((int64_t)kcs.size() == B && (int64_t)vcs.size() == B && (int64_t)ns.size() == B,
              "decode_attend: one cache, one start and one row count per sequence");
  std::vector<int64_t> seq_of, pos_of;  // each row's sequence and cache position
  seq_of.reserve(N), pos_of.reserve(N);
  for (int64_t b = 0; b < B; ++b) {
    const auto& kc = kcs[b];
    TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vcs[b].sizes() && kc.is_contiguous() && vcs[b].is_contiguous() &&
                    kc.scalar_type() == at::kFloat && vcs[b].scalar_type() == at::kFloat && kc.size(1) == KV &&
                    kc.size(3) == D && layer >= 0 && layer < kc.size(0) && starts[b] >= 0 && ns[b] >= 1 &&
                    starts[b] + ns[b] <= kc.size(2),
                "decode_attend: a cache must be float32 contiguous [layers, KV, capacity, D] with room for its rows");
    for (int64_t r = 0; r < ns[b]; ++r) seq_of.push_back(b), pos_of.push_back(starts[b] + r);
  }
  TORCH_CHECK((int64_t)seq_of.size() == N, "decode_attend: the rows of q must be the sequences' rows, in order");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  for (int64_t i = 0; i < N; ++i) {  // every row's key and value into its cache, at its position
    const int64_t b = seq_of[i], cap = kcs[b].size(2);
    float* kc = kcs[b].data_ptr<float>() + layer * KV * cap * D;
    float* vc = vcs[b].data_ptr<float>() + layer * KV * cap * D;
    for (int64_t g = 0; g < KV; ++g) {
      std::memcpy(kc + (g * cap + pos_of[i]) * D, k.data_ptr<float>() + (i * KV + g) * D, D * sizeof(float));
      std::memcpy(vc + (g * cap + pos_of[i]) * D, v.data_ptr<float>() + (i * KV + g) * D, D * sizeof(float));
    }
  }
  auto out = at::empty({N, H, D}, q.options());
  const float scale = static_cast<float>(scaling);
  const int64_t G = H / KV;
  at::parallel_for(0, N * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s;
    for (int64_t i = i0; i < i1; ++i) {  // row i / H attends over its cache up to its own position
      const int64_t row = i / H, h = i % H, b = seq_of[row], g = h / G, cap = kcs[b].size(2);
      const float* K = kcs[b].data_ptr<float>() + ((layer * KV + g) * cap) * D;
      const float* V = vcs[b].data_ptr<float>() + ((layer * KV + g) * cap) * D;
      head(q.data_ptr<float>() + i * D, K, V, pos_of[row] + 1, D, scale, out.data_ptr<float>() + i * D, s);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crossdraft, m) {
  m.def("decode_attend(Tensor q, Tensor k, Tensor v, Tensor(a!)[] kcs, Tensor(b!)[] vcs, int layer, int[] starts, "
        "int[] ns, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(crossdraft, CPU, m) { m.impl("decode_attend", decode_attend); }
