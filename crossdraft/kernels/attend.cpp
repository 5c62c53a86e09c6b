// crossdraft's CPU kernel for decoding steps' attention, float32 over float32 or bfloat16 caches:
// `decode_attend`.
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

// A cache holds float32, or bfloat16 (`--kv-dtype bfloat16`): loads widen it to float32 exactly, and
// everything after a load is the same float32 arithmetic in the same order for both.
inline vec kv_load(const float* p) { return vload(p); }
inline vec kv_load(const at::BFloat16* p) { return vload_bf16(reinterpret_cast<const uint16_t*>(p)); }
inline float kv_float(float x) { return x; }
inline float kv_float(at::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  int64_t d = 0;
  float sum = 0.f;
  if (D >= LANES) {
    vec acc = vzero();
    for (; d + LANES <= D; d += LANES) acc = vfma(vload(a + d), kv_load(b + d), acc);
    sum = vsum(acc);
  }
  for (; d < D; ++d) sum += a[d] * kv_float(b[d]);
  return sum;
}

template <typename T>
inline void prefetch_row(const T* row, int64_t D) {  // one cache row of D entries on its way to L2
  for (int64_t b = 0; b < D * (int64_t)sizeof(T); b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T1);
}

// The scores of the first positions of a head, LANES at a time (D = NV x LANES): s[p] = dot(q, key(p))
// x scale, bit for bit, and m their maximum. Each position's sum is the same FMA chain as `dot`'s and
// the same sum of its lanes as `vsum`'s (`vsum_lanes`), so only the speed differs: one shuffle tree for
// LANES positions instead of a store and LANES - 1 scalar additions each, which made a key's score cost
// more than reading it. Returns where it stopped (the last end % LANES positions are the caller's).
template <typename T, int NV, typename Key, typename Value>
inline const float* scores(const float* q, const Key& key, const Value& value, int64_t end, float scale, float* s,
                           float& m) {
  constexpr int64_t D = NV * LANES;
  vec qv[NV], acc[LANES];
  for (int i = 0; i < NV; ++i) qv[i] = vload(q + i * LANES);
  vec vm = vset(m);
  const vec vscale = vset(scale);
  int64_t p = 0;
  for (; p + LANES <= end; p += LANES) {
    for (int j = 0; j < LANES; ++j) {
      prefetch_row(value(p + j), D);
      const T* k = key(p + j);
      vec a = vzero();
      for (int i = 0; i < NV; ++i) a = vfma(qv[i], kv_load(k + i * LANES), a);
      acc[j] = a;
    }
    const vec sc = vmul(vsum_lanes(acc), vscale);
    vstore(s + p, sc);
    vm = vmax(vm, sc);
  }
  float lanes[LANES];
  vstore(lanes, vm);
  for (int64_t j = 0; j < LANES; ++j) m = std::max(m, lanes[j]);
  return s + p;
}

// One head of one sequence: out[0 .. D) from q[0 .. D) over keys/values [0, end) (rows of D entries), the
// last of them (the row's own) at `own_k`, `own_v` (in a causal block, K + (end - 1) D: the same sums in
// the same order, so a row that sees its block's first rows and itself gives the bits it would give there).
// Scores, their maximum, then e^(score - max) LANES at a time (the last LANES padded with scores of
// -inf, whose e^ is 0) and their sum; then the weighted values, position by position, in NV vector
// registers where D = NV x LANES (NV > 0), else in `out`: the same sums in the same order either way.
// Memory: while the keys are read, the values are fetched; while the values are summed, the keys of the
// next head (`next_K`, `next_end`; null for the last) are: a pass reads every cache from memory once,
// and a stream that waits on one head at a time leaves the memory idle between them.
template <typename T, int NV>
void head(const float* q, const T* K, const T* V, int64_t end, int64_t D, float scale, float* out,
          std::vector<float>& s, const T* next_K, int64_t next_end, const T* own_k, const T* own_v) {
  const int64_t padded = (end + LANES - 1) / LANES * LANES;
  const auto key = [&](int64_t p) { return p + 1 == end ? own_k : K + p * D; };
  const auto value = [&](int64_t p) { return p + 1 == end ? own_v : V + p * D; };
  s.resize(padded);
  float m = -std::numeric_limits<float>::infinity();
  int64_t p = 0;
  if constexpr (NV > 0) {
    const float* const pre = scores<T, NV>(q, key, value, end, scale, s.data(), m);
    p = pre - s.data();
  }
  for (; p < end; ++p) {
    prefetch_row(value(p), D);
    s[p] = dot(q, key(p), D) * scale;
    m = std::max(m, s[p]);
  }
  for (int64_t p = end; p < padded; ++p) s[p] = -std::numeric_limits<float>::infinity();
  const vec vm = vset(-m);
  vec sums = vzero();
  for (int64_t p = 0; p < padded; p += LANES) {
    const vec e = vexp(vadd(vload(&s[p]), vm));
    vstore(&s[p], e);
    sums = vadd(sums, e);
  }
  const float total = vsum(sums);
  if constexpr (NV > 0) {
    vec acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = vzero();
    for (int64_t p = 0; p < end; ++p) {
      if (next_K != nullptr && p < next_end) prefetch_row(next_K + p * D, D);
      const T* v = value(p);
      const vec w = vset(s[p]);
      for (int i = 0; i < NV; ++i) acc[i] = vfma(w, kv_load(v + i * LANES), acc[i]);
    }
    for (int i = 0; i < NV; ++i) vstore(out + i * LANES, acc[i]);
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
    const int64_t vd = D / LANES * LANES;
    for (int64_t p = 0; p < end; ++p) {
      if (next_K != nullptr && p < next_end) prefetch_row(next_K + p * D, D);
      const T* v = value(p);
      const vec w = vset(s[p]);
      for (int64_t d = 0; d < vd; d += LANES) vstore(out + d, vfma(w, kv_load(v + d), vload(out + d)));
      for (int64_t d = vd; d < D; ++d) out[d] += s[p] * kv_float(v[d]);
    }
  }
  for (int64_t p = end; next_K != nullptr && p < next_end; ++p) prefetch_row(next_K + p * D, D);
  for (int64_t d = 0; d < D; ++d) out[d] /= total;
}

template <typename T>
using HeadFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, float, float*, std::vector<float>&,
                        const T*, int64_t, const T*, const T*);

// head<T, NV> with the output in registers where the head size allows (D = 1, 2, 4 or 8 vectors).
template <typename T>
HeadFn<T> head_for(int64_t D) {
  if (D % LANES == 0) {
    switch (D / LANES) {
      case 1: return head<T, 1>;
      case 2: return head<T, 2>;
      case 4: return head<T, 4>;
      case 8: return head<T, 8>;
      default: break;
    }
  }
  return head<T, 0>;
}

// Every row's key and value into its cache at its position (rounded to nearest even where the cache is
// bfloat16), then each row's attention over its cache's first seen_of[row] positions and its own.
template <typename T>
void write_and_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::TensorList kcs,
                      at::TensorList vcs, int64_t layer, const std::vector<int64_t>& seq_of,
                      const std::vector<int64_t>& pos_of, const std::vector<int64_t>& seen_of, int64_t H,
                      int64_t KV, int64_t D, float scale, at::Tensor& out) {
  const int64_t N = (int64_t)seq_of.size();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t b = seq_of[i], cap = kcs[b].size(2);
    T* kc = kcs[b].data_ptr<T>() + layer * KV * cap * D;
    T* vc = vcs[b].data_ptr<T>() + layer * KV * cap * D;
    const float* ki = k.data_ptr<float>() + i * KV * D;
    const float* vi = v.data_ptr<float>() + i * KV * D;
    for (int64_t g = 0; g < KV; ++g)
      for (int64_t d = 0; d < D; ++d) {
        kc[(g * cap + pos_of[i]) * D + d] = static_cast<T>(ki[g * D + d]);
        vc[(g * cap + pos_of[i]) * D + d] = static_cast<T>(vi[g * D + d]);
      }
  }
  const int64_t G = H / KV;
  const HeadFn<T> attend_head = head_for<T>(D);
  at::parallel_for(0, N * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s;
    const auto keys_of = [&](int64_t i) {  // row i / H's keys (its head's kv head, this layer)
      const int64_t b = seq_of[i / H];
      return kcs[b].data_ptr<T>() + ((layer * KV + (i % H) / G) * kcs[b].size(2)) * D;
    };
    for (int64_t i = i0; i < i1; ++i) {  // row i / H attends over the positions it sees, then its own
      const int64_t row = i / H, b = seq_of[row], g = (i % H) / G, cap = kcs[b].size(2);
      const T* K = keys_of(i);
      const T* V = vcs[b].data_ptr<T>() + ((layer * KV + g) * cap) * D;
      const bool last = i + 1 == i1;
      attend_head(q.data_ptr<float>() + i * D, K, V, seen_of[row] + 1, D, scale, out.data_ptr<float>() + i * D,
                  s, last ? nullptr : keys_of(i + 1), last ? 0 : seen_of[(i + 1) / H] + 1, K + pos_of[row] * D,
                  V + pos_of[row] * D);
    }
  });
}

at::Tensor decode_attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         at::TensorList kcs, at::TensorList vcs, int64_t layer, at::IntArrayRef starts,
                         at::IntArrayRef ns, double scaling, at::IntArrayRef seen) {
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
  const auto kv_type = B > 0 ? kcs[0].scalar_type() : at::kFloat;
  TORCH_CHECK(kv_type == at::kFloat || kv_type == at::kBFloat16, "decode_attend: caches must be float32 or bfloat16");
  std::vector<int64_t> seq_of, pos_of;  // each row's sequence and cache position
  seq_of.reserve(N), pos_of.reserve(N);
  for (int64_t b = 0; b < B; ++b) {
    const auto& kc = kcs[b];
    TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vcs[b].sizes() && kc.is_contiguous() && vcs[b].is_contiguous() &&
                    kc.scalar_type() == kv_type && vcs[b].scalar_type() == kv_type && kc.size(1) == KV &&
                    kc.size(3) == D && layer >= 0 && layer < kc.size(0) && starts[b] >= 0 && ns[b] >= 1 &&
                    starts[b] + ns[b] <= kc.size(2),
                "decode_attend: a cache must be contiguous [layers, KV, capacity, D], in the first cache's dtype, with room for its rows");
    for (int64_t r = 0; r < ns[b]; ++r) seq_of.push_back(b), pos_of.push_back(starts[b] + r);
  }
  TORCH_CHECK((int64_t)seq_of.size() == N, "decode_attend: the rows of q must be the sequences' rows, in order");
  std::vector<int64_t> seen_of(pos_of);  // positions before its own that a row sees (a causal block: all)
  TORCH_CHECK(seen.empty() || (int64_t)seen.size() == N, "decode_attend: `seen` must be empty or one entry per row");
  for (int64_t i = 0; i < (int64_t)seen.size(); ++i) {
    TORCH_CHECK(seen[i] >= 0 && seen[i] <= pos_of[i], "decode_attend: a row sees at most the positions before its own");
    seen_of[i] = seen[i];
  }
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto out = at::empty({N, H, D}, q.options());
  const float scale = static_cast<float>(scaling);
  if (kv_type == at::kBFloat16)
    write_and_attend<at::BFloat16>(q, k, v, kcs, vcs, layer, seq_of, pos_of, seen_of, H, KV, D, scale, out);
  else
    write_and_attend<float>(q, k, v, kcs, vcs, layer, seq_of, pos_of, seen_of, H, KV, D, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crossdraft, m) {
  m.def("decode_attend(Tensor q, Tensor k, Tensor v, Tensor(a!)[] kcs, Tensor(b!)[] vcs, int layer, int[] starts, "
        "int[] ns, float scaling, int[] seen=[]) -> Tensor");
}

TORCH_LIBRARY_IMPL(crossdraft, CPU, m) { m.impl("decode_attend", decode_attend); }
