// FlashAttention (Dao et al. 2022) for XLA:CPU, forward and backward, in float32.
//
// XLA:CPU runs attention's batched products (q k^T, p v and the four backward ones) as
// single-threaded dot thunks at about half PyTorch's per-core rate, and moves q/k/v into
// heads-major layouts and back around them. This kernel reads q/k/v in the model's own
// `[B, L, N, H]` / `[B, S, K, H]` layouts, works in query x key tiles that stay in cache,
// keeps the softmax online (the `[L, S]` probabilities never reach memory), skips the key
// tiles a causal mask hides, and spreads (batch, kv head) work items over XLA's intra-op
// thread pool. Built on first use by llmjax/kernels/cpu_attention.py (g++ -O3
// -march=native); the products use AVX-512 when the build machine has it.
//
// Forward:  o = softmax(scale q k^T, masked) v,  lse = log-sum-exp of each query's row.
// Backward: p = exp(scale q k^T - lse), dp = do v^T, ds = p (dp - rowsum(do o)) scale,
//           dq = ds k, dk = ds^T q, dv = p^T do.
// A query that may attend to no key gets o = 0, lse = +inf and no gradient.
//
// Attention dropout (rate r): the probabilities that multiply v are p * z / (1 - r), z
// a keep bit drawn by hashing (seed, batch, head, query, key) (`KeepBits`), so the
// backward pass redraws the forward's bits instead of storing them; normalization and lse
// use the undropped p. Backward: dv = (p z / (1 - r))^T do, dp = (do v^T) z / (1 - r);
// rowsum(do o) is still sum_j p dp, so ds keeps its form.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// c[m x n] (+)= a[m x k] b[k x n]; row-major with leading dimensions lda, ldb, ldc.
#if defined(__AVX512F__)
template <int MR>
inline void GemmRows(int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t left = n - j;
    const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= 32 ? 0xFFFF
                         : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1)
                                     : 0;
    __m512 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) {
      acc0[r] = accumulate ? _mm512_maskz_loadu_ps(m0, c + r * ldc + j) : _mm512_setzero_ps();
      acc1[r] = accumulate ? _mm512_maskz_loadu_ps(m1, c + r * ldc + j + 16)
                           : _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < k; ++p) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + p * ldb + j);
      const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + p * ldb + j + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + p]);
        acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm512_mask_storeu_ps(c + r * ldc + j, m0, acc0[r]);
      _mm512_mask_storeu_ps(c + r * ldc + j + 16, m1, acc1[r]);
    }
  }
}
#else
template <int MR>
inline void GemmRows(int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (!accumulate) std::fill(cr, cr + n, 0.0f);
    for (int64_t p = 0; p < k; ++p) {
      const float av = a[r * lda + p];
      const float* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) cr[j] += av * bp[j];
    }
  }
}
#endif

void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) GemmRows<4>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < m; ++i) GemmRows<1>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
}

// x[i] = exp(x[i] - shift); entries at -inf (masked) become exactly 0. Returns the sum.
float ExpShifted(float* x, int64_t n, float shift) {
  int64_t j = 0;
  float total = 0.0f;
#if defined(__AVX512F__)
  // exp(t) = 2^r * e^f with r = round(t log2 e), |f| <= ln2 / 2, e^f by a degree-6
  // Taylor polynomial (relative error < 2e-7).
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 lo = _mm512_set1_ps(-104.0f);
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 t0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), s);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(m, t0, lo, _CMP_GE_OQ);
    const __m512 t = _mm512_max_ps(t0, lo);
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(t, log2e),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fnmadd_ps(r, ln2_lo, _mm512_fnmadd_ps(r, ln2_hi, t));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512 e = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, r));
    _mm512_mask_storeu_ps(x + j, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#else
  for (; j < n; ++j) {
    x[j] = x[j] == kNegInf ? 0.0f : std::exp(x[j] - shift);
    total += x[j];
  }
#endif
  return total;
}

// Shapes and options shared by the forward and backward items.
struct Problem {
  int64_t batch, q_len, k_len, heads, kv_heads, head_dim;
  float scale;
  bool causal;
  const bool* mask;      // [mask_batch, L, S] or null; true = may attend
  int64_t mask_batch;
  float dropout_rate;    // 0: no dropout
  uint32_t seed[2];      // dropout's random stream
  int64_t batch_offset, head_offset;  // this shard's first (global) batch row and head
  int64_t QRow() const { return heads * head_dim; }       // stride of one query position
  int64_t KRow() const { return kv_heads * head_dim; }    // stride of one key position
  int64_t KeyEnd(int64_t q_end) const { return causal ? std::min(k_len, q_end) : k_len; }
};

// murmur3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2.
inline uint32_t Mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The random bits of one (batch, head, query) row: bits(key j) = Mix(row ^ j * 0x9E3779B1);
// a key is kept when its bits are >= rate * 2^32. `batch` and `head` are global (with the
// shard's offsets), so a sharded call draws what one device would.
inline uint32_t RowKey(const Problem& pb, int64_t b, int64_t n, int64_t i) {
  uint32_t h = Mix(pb.seed[0] ^ Mix(static_cast<uint32_t>(pb.batch_offset + b) + 0x9E3779B9u));
  h = Mix(h ^ static_cast<uint32_t>(pb.head_offset + n) * 0x85EBCA77u);
  return Mix(h ^ pb.seed[1] ^ static_cast<uint32_t>(i) * 0xC2B2AE3Du);
}

inline uint32_t DropThreshold(float rate) {
  return static_cast<uint32_t>(std::min(static_cast<double>(rate) * 4294967296.0, 4294967295.0));
}

// f[i, j] = keep(b, n, q0 + i, k0 + j) / (1 - rate), rows x cols into ld-strided rows.
void DropoutFactors(const Problem& pb, int64_t b, int64_t n, int64_t q0, int64_t rows,
                    int64_t k0, int64_t cols, float* f, int64_t ld) {
  const uint32_t threshold = DropThreshold(pb.dropout_rate);
  const float kept = 1.0f / (1.0f - pb.dropout_rate);
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t row = RowKey(pb, b, n, q0 + i);
    float* fi = f + i * ld;
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i golden = _mm512_set1_epi32(static_cast<int>(0x9E3779B1u));
    const __m512i c1 = _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu));
    const __m512i c2 = _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u));
    const __m512i rowv = _mm512_set1_epi32(static_cast<int>(row));
    const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
    for (; j + 16 <= cols; j += 16) {
      __m512i h = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k0 + j)), lanes);
      h = _mm512_xor_si512(rowv, _mm512_mullo_epi32(h, golden));
      h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
      h = _mm512_mullo_epi32(h, c1);
      h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
      h = _mm512_mullo_epi32(h, c2);
      h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
      const __mmask16 keep = _mm512_cmpge_epu32_mask(h, thr);
      _mm512_storeu_ps(fi + j, _mm512_maskz_mov_ps(keep, _mm512_set1_ps(kept)));
    }
#endif
    for (; j < cols; ++j) {
      const uint32_t bits = Mix(row ^ static_cast<uint32_t>(k0 + j) * 0x9E3779B1u);
      fi[j] = bits >= threshold ? kept : 0.0f;
    }
  }
}

// Scores of queries q0:q0+rows against keys k0:k0+cols into s[rows x kKeyTile], scaled
// and masked (-inf where a query may not attend).
void Scores(const Problem& pb, int64_t b, const float* q, const float* kt, int64_t q0,
            int64_t rows, int64_t k0, int64_t cols, float* s) {
  Gemm(rows, cols, pb.head_dim, q + q0 * pb.QRow(), pb.QRow(), kt + k0, pb.k_len, s,
       kKeyTile, false);
  const bool* mask = pb.mask == nullptr ? nullptr
      : pb.mask + (pb.mask_batch == 1 ? 0 : b) * pb.q_len * pb.k_len;
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * kKeyTile;
    for (int64_t j = 0; j < cols; ++j) row[j] *= pb.scale;
    if (pb.causal) {
      for (int64_t j = std::max<int64_t>(0, q0 + i + 1 - k0); j < cols; ++j) row[j] = kNegInf;
    }
    if (mask != nullptr) {
      const bool* mrow = mask + (q0 + i) * pb.k_len + k0;
      for (int64_t j = 0; j < cols; ++j) if (!mrow[j]) row[j] = kNegInf;
    }
  }
}

// `[positions, rows of stride `stride`, head_dim]` slice -> head_dim x positions.
void Transpose(const float* x, int64_t positions, int64_t stride, int64_t head_dim,
               float* out) {
  for (int64_t s = 0; s < positions; ++s)
    for (int64_t h = 0; h < head_dim; ++h) out[h * positions + s] = x[s * stride + h];
}

void TransposeTile(const float* x, int64_t rows, int64_t cols, int64_t ldx, float* out,
                   int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * ldo + i] = x[i * ldx + j];
}

// Runs item(0..count-1) on the caller and on XLA's intra-op pool. The caller never waits
// for an item that has not started, so nested or concurrent calls cannot deadlock.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, F item) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, item]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < count; ++finished) item(i);
    if (finished == 0) return;
    std::lock_guard<std::mutex> lock(state->mu);
    state->done += finished;
    if (state->done == count) state->cv.notify_all();
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == count; });
}

void ForwardItem(const Problem& pb, int64_t item, const float* q_all, const float* k_all,
                 const float* v_all, float* o_all, float* lse_all) {
  const int64_t b = item / pb.kv_heads, kvh = item % pb.kv_heads, hd = pb.head_dim;
  const int64_t group = pb.heads / pb.kv_heads;
  const float* k = k_all + b * pb.k_len * pb.KRow() + kvh * hd;
  const float* v = v_all + b * pb.k_len * pb.KRow() + kvh * hd;
  std::vector<float> kt(hd * pb.k_len), s(kQueryTile * kKeyTile), acc(kQueryTile * hd);
  std::vector<float> row_max(kQueryTile), row_sum(kQueryTile);
  std::vector<float> drop(pb.dropout_rate > 0.0f ? kQueryTile * kKeyTile : 0);
  Transpose(k, pb.k_len, pb.KRow(), hd, kt.data());
  for (int64_t n = kvh * group; n < (kvh + 1) * group; ++n) {
    const float* q = q_all + b * pb.q_len * pb.QRow() + n * hd;
    float* o = o_all + b * pb.q_len * pb.QRow() + n * hd;
    float* lse = lse_all + (b * pb.heads + n) * pb.q_len;
    for (int64_t q0 = 0; q0 < pb.q_len; q0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, pb.q_len - q0);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t key_end = pb.KeyEnd(q0 + rows);
      for (int64_t k0 = 0; k0 < key_end; k0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, key_end - k0);
        Scores(pb, b, q, kt.data(), q0, rows, k0, cols, s.data());
        for (int64_t i = 0; i < rows; ++i) {
          float* row = s.data() + i * kKeyTile;
          const float tile_max = *std::max_element(row, row + cols);
          const float new_max = std::max(row_max[i], tile_max);
          if (new_max == kNegInf) {  // nothing visible yet: the row stays empty
            std::fill(row, row + cols, 0.0f);
            continue;
          }
          const float rescale = std::exp(row_max[i] - new_max);  // exp(-inf) = 0
          row_sum[i] = row_sum[i] * rescale + ExpShifted(row, cols, new_max);
          row_max[i] = new_max;
          if (rescale != 1.0f)
            for (int64_t h = 0; h < hd; ++h) acc[i * hd + h] *= rescale;
        }
        if (!drop.empty()) {  // after the sums: normalization counts every key
          DropoutFactors(pb, b, n, q0, rows, k0, cols, drop.data(), kKeyTile);
          for (int64_t i = 0; i < rows * kKeyTile; ++i) s[i] *= drop[i];
        }
        Gemm(rows, hd, cols, s.data(), kKeyTile, v + k0 * pb.KRow(), pb.KRow(), acc.data(),
             hd, true);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f;
        float* out = o + (q0 + i) * pb.QRow();
        for (int64_t h = 0; h < hd; ++h) out[h] = acc[i * hd + h] * inv;
        lse[q0 + i] = row_sum[i] > 0.0f ? row_max[i] + std::log(row_sum[i])
                                        : std::numeric_limits<float>::infinity();
      }
    }
  }
}

void BackwardItem(const Problem& pb, int64_t item, const float* q_all, const float* k_all,
                  const float* v_all, const float* o_all, const float* lse_all,
                  const float* do_all, float* dq_all, float* dk_all, float* dv_all) {
  const int64_t b = item / pb.kv_heads, kvh = item % pb.kv_heads, hd = pb.head_dim;
  const int64_t group = pb.heads / pb.kv_heads;
  const int64_t kv_offset = b * pb.k_len * pb.KRow() + kvh * hd;
  const float* k = k_all + kv_offset;
  const float* v = v_all + kv_offset;
  std::vector<float> kt(hd * pb.k_len), vt(hd * pb.k_len), dk(pb.k_len * hd, 0.0f),
      dv(pb.k_len * hd, 0.0f), p(kQueryTile * kKeyTile), ds(kQueryTile * kKeyTile),
      tile_t(kKeyTile * kQueryTile), dq(kQueryTile * hd), delta(kQueryTile),
      drop(pb.dropout_rate > 0.0f ? kQueryTile * kKeyTile : 0);
  Transpose(k, pb.k_len, pb.KRow(), hd, kt.data());
  Transpose(v, pb.k_len, pb.KRow(), hd, vt.data());
  for (int64_t n = kvh * group; n < (kvh + 1) * group; ++n) {
    const int64_t q_offset = b * pb.q_len * pb.QRow() + n * hd;
    const float* q = q_all + q_offset;
    const float* o = o_all + q_offset;
    const float* d_o = do_all + q_offset;
    const float* lse = lse_all + (b * pb.heads + n) * pb.q_len;
    for (int64_t q0 = 0; q0 < pb.q_len; q0 += kQueryTile) {
      const int64_t rows = std::min(kQueryTile, pb.q_len - q0);
      for (int64_t i = 0; i < rows; ++i) {
        const float* oi = o + (q0 + i) * pb.QRow();
        const float* gi = d_o + (q0 + i) * pb.QRow();
        float sum = 0.0f;
        for (int64_t h = 0; h < hd; ++h) sum += oi[h] * gi[h];
        delta[i] = sum;
      }
      std::fill(dq.begin(), dq.end(), 0.0f);
      const int64_t key_end = pb.KeyEnd(q0 + rows);
      for (int64_t k0 = 0; k0 < key_end; k0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, key_end - k0);
        Scores(pb, b, q, kt.data(), q0, rows, k0, cols, p.data());
        for (int64_t i = 0; i < rows; ++i) ExpShifted(p.data() + i * kKeyTile, cols, lse[q0 + i]);
        Gemm(rows, cols, hd, d_o + q0 * pb.QRow(), pb.QRow(), vt.data() + k0, pb.k_len,
             ds.data(), kKeyTile, false);                                  // dp = do v^T
        if (!drop.empty()) {
          DropoutFactors(pb, b, n, q0, rows, k0, cols, drop.data(), kKeyTile);
          for (int64_t i = 0; i < rows * kKeyTile; ++i) ds[i] *= drop[i];  // dp through z
        }
        for (int64_t i = 0; i < rows; ++i) {
          const float* pi = p.data() + i * kKeyTile;
          float* di = ds.data() + i * kKeyTile;
          for (int64_t j = 0; j < cols; ++j) di[j] = pi[j] * (di[j] - delta[i]) * pb.scale;
        }
        Gemm(rows, hd, cols, ds.data(), kKeyTile, k + k0 * pb.KRow(), pb.KRow(), dq.data(),
             hd, true);                                                    // dq += ds k
        TransposeTile(ds.data(), rows, cols, kKeyTile, tile_t.data(), kQueryTile);
        Gemm(cols, hd, rows, tile_t.data(), kQueryTile, q + q0 * pb.QRow(), pb.QRow(),
             dk.data() + k0 * hd, hd, true);                               // dk += ds^T q
        if (!drop.empty())  // dv sees the dropped probabilities
          for (int64_t i = 0; i < rows * kKeyTile; ++i) p[i] *= drop[i];
        TransposeTile(p.data(), rows, cols, kKeyTile, tile_t.data(), kQueryTile);
        Gemm(cols, hd, rows, tile_t.data(), kQueryTile, d_o + q0 * pb.QRow(), pb.QRow(),
             dv.data() + k0 * hd, hd, true);                               // dv += p^T do
      }
      float* dq_out = dq_all + q_offset + q0 * pb.QRow();
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(dq_out + i * pb.QRow(), dq.data() + i * hd, hd * sizeof(float));
    }
  }
  for (int64_t s = 0; s < pb.k_len; ++s) {
    std::memcpy(dk_all + kv_offset + s * pb.KRow(), dk.data() + s * hd, hd * sizeof(float));
    std::memcpy(dv_all + kv_offset + s * pb.KRow(), dv.data() + s * hd, hd * sizeof(float));
  }
}

ffi::Error MakeProblem(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::PRED>& mask, ffi::Buffer<ffi::U32>& rng, float scale,
                       bool causal, bool has_mask, float dropout_rate, Problem* pb) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("q, k, v must be [B, L, N, H] / [B, S, K, H]");
  if (rng.element_count() != 4)
    return ffi::Error::InvalidArgument("rng must be u32[4]: seed, seed, batch and head offset");
  if (!(dropout_rate >= 0.0f && dropout_rate < 1.0f))
    return ffi::Error::InvalidArgument("dropout_rate must be in [0, 1)");
  const uint32_t* r = rng.typed_data();
  *pb = Problem{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], scale, causal, nullptr, 1,
                dropout_rate, {r[0], r[1]}, r[2], r[3]};
  if (kd[0] != pb->batch || kd[3] != pb->head_dim || pb->heads % pb->kv_heads != 0)
    return ffi::Error::InvalidArgument("k/v shape does not match q");
  if (causal && pb->q_len != pb->k_len)
    return ffi::Error::InvalidArgument("causal attention needs L == S");
  if (has_mask) {
    auto md = mask.dimensions();
    if (md.size() != 3 || md[1] != pb->q_len || md[2] != pb->k_len ||
        (md[0] != 1 && md[0] != pb->batch))
      return ffi::Error::InvalidArgument("mask must be [B or 1, L, S]");
    pb->mask = reinterpret_cast<const bool*>(mask.typed_data());
    pb->mask_batch = md[0];
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                   ffi::Buffer<ffi::U32> rng, float scale, bool causal, bool has_mask,
                   float dropout_rate, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Problem pb;
  if (auto err = MakeProblem(q, k, mask, rng, scale, causal, has_mask, dropout_rate, &pb);
      err.failure())
    return err;
  ParallelFor(pool, pb.batch * pb.kv_heads, [&](int64_t item) {
    ForwardItem(pb, item, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(),
                lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                    ffi::Buffer<ffi::U32> rng, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o, float scale,
                    bool causal, bool has_mask, float dropout_rate,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Problem pb;
  if (auto err = MakeProblem(q, k, mask, rng, scale, causal, has_mask, dropout_rate, &pb);
      err.failure())
    return err;
  ParallelFor(pool, pb.batch * pb.kv_heads, [&](int64_t item) {
    BackwardItem(pb, item, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(),
                 lse.typed_data(), d_o.typed_data(), dq->typed_data(), dk->typed_data(),
                 dv->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmjaxFlashAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<float>("dropout_rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmjaxFlashAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<float>("dropout_rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
