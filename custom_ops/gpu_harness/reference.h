// Float64 CPU reference of every GPU kernel, read straight from the
// definitions (no blocking tricks): the harness's ground truth.
//
// Letters as in custom_ops/cuda/blocksparse_gpu.h. Dense tensors [B, N, H, D],
// block-sparse [B, G, Z, b, b], lse [B, H, N].
#ifndef SPARSE_ATTENTION_TF_GPU_HARNESS_REFERENCE_H_
#define SPARSE_ATTENTION_TF_GPU_HARNESS_REFERENCE_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "custom_ops/gpu_harness/tables.h"

namespace sparse_attention {
namespace harness {

using Vec = std::vector<double>;

struct RefProblem {
  int64_t batch, seq, heads, head_dim, value_dim;
  const HostTables* t;
  const std::vector<uint8_t>* key_padding;  // [B, N] (1: real key), or null
  double scale;

  int64_t block() const { return t->block; }
  int64_t groups() const { return heads / t->layout_heads; }
  int64_t dense(int64_t b, int64_t n, int64_t head, int64_t width) const {
    return ((b * seq + n) * heads + head) * width;
  }
  int64_t sparse(int64_t b, int64_t g, int64_t z) const {
    return ((b * groups() + g) * t->nnz() + z) * block() * block();
  }
  bool key_real(int64_t b, int64_t key) const {
    return key_padding == nullptr || (*key_padding)[b * seq + key] != 0;
  }
};

// Visible keys of query n of (b, head): (key, block z) pairs.
inline void VisibleKeys(const RefProblem& p, int64_t b, int64_t head, int64_t n,
                        std::vector<int64_t>* keys) {
  keys->clear();
  const HostTables& t = *p.t;
  const int64_t bs = t.block, nb = t.num_blocks();
  const int64_t row = (head % t.layout_heads) * nb + n / bs;
  for (int64_t z = t.row_offsets[row]; z < t.row_offsets[row + 1]; ++z) {
    const int64_t j0 = int64_t(t.blocks[3 * z + 2]) * bs;
    for (int64_t c = 0; c < bs; ++c)
      if (t.kept(z, n % bs, c) && p.key_real(b, j0 + c)) keys->push_back(j0 + c);
  }
}

// out [B, N, H, Dv] and lse [B, H, N] of the fused forward; with dout also
// dq, dk, dv of the fused backward (pass null to skip it).
//
// Every sum runs over visible (query, key) pairs only, so a NaN or inf in
// q, k or dout reaches exactly the outputs of the ops.attention docstring
// (the non-finite sets of tests/test_nonfinite.py's float64 prediction). A
// row whose lse is not finite (NaN: it sees a NaN score; +inf: a +inf score;
// -inf: every visible score is -inf, or it sees no key) takes the kernels'
// probabilities exp(s - inf): 0, except NaN where its score is NaN or +inf.
inline void RefAttention(const RefProblem& p, const Vec& q, const Vec& k, const Vec& v, Vec* out,
                         Vec* lse, const Vec* dout, Vec* dq, Vec* dk, Vec* dv) {
  const int64_t D = p.head_dim, Dv = p.value_dim;
  out->assign(p.batch * p.seq * p.heads * Dv, 0.0);
  lse->assign(p.batch * p.heads * p.seq, -std::numeric_limits<double>::infinity());
  if (dout != nullptr) {
    dq->assign(q.size(), 0.0);
    dk->assign(k.size(), 0.0);
    dv->assign(v.size(), 0.0);
  }
  std::vector<int64_t> keys;
  std::vector<double> s, prob;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t head = 0; head < p.heads; ++head)
      for (int64_t n = 0; n < p.seq; ++n) {
        VisibleKeys(p, b, head, n, &keys);
        if (keys.empty()) continue;
        const double* qi = &q[p.dense(b, n, head, D)];
        s.assign(keys.size(), 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        bool nan = false;
        for (size_t e = 0; e < keys.size(); ++e) {
          const double* kj = &k[p.dense(b, keys[e], head, D)];
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
          s[e] = p.scale * dot;
          nan |= std::isnan(s[e]);
          mx = std::max(mx, s[e]);
        }
        const double shift = nan || !std::isfinite(mx) ? 0.0 : mx;
        double sum = 0.0;
        for (double x : s) sum += std::exp(x - shift);
        const double l = shift + std::log(sum);  // NaN, +inf or -inf as above
        (*lse)[(b * p.heads + head) * p.seq + n] = l;
        const double use = std::isfinite(l) ? l : std::numeric_limits<double>::infinity();
        prob.resize(keys.size());
        double* o = &(*out)[p.dense(b, n, head, Dv)];
        for (size_t e = 0; e < keys.size(); ++e) {
          prob[e] = std::exp(s[e] - use);
          const double* vj = &v[p.dense(b, keys[e], head, Dv)];
          for (int64_t d = 0; d < Dv; ++d) o[d] += prob[e] * vj[d];
        }
        if (dout == nullptr) continue;
        const double* go = &(*dout)[p.dense(b, n, head, Dv)];
        double delta = 0.0;
        for (int64_t d = 0; d < Dv; ++d) delta += go[d] * o[d];
        double* gq = &(*dq)[p.dense(b, n, head, D)];
        for (size_t e = 0; e < keys.size(); ++e) {
          const int64_t j = keys[e];
          const double* vj = &v[p.dense(b, j, head, Dv)];
          const double* kj = &k[p.dense(b, j, head, D)];
          double dp = 0.0;
          for (int64_t d = 0; d < Dv; ++d) dp += go[d] * vj[d];
          const double ds = prob[e] * (dp - delta) * p.scale;
          double* gk = &(*dk)[p.dense(b, j, head, D)];
          double* gv = &(*dv)[p.dense(b, j, head, Dv)];
          for (int64_t d = 0; d < D; ++d) {
            gq[d] += ds * kj[d];
            gk[d] += ds * qi[d];
          }
          for (int64_t d = 0; d < Dv; ++d) gv[d] += prob[e] * go[d];
        }
      }
}

// out[b, g, z] = A_I B_J^T.
inline Vec RefSdd(const RefProblem& p, const Vec& a, const Vec& bmat) {
  const HostTables& t = *p.t;
  const int64_t bs = t.block, D = p.head_dim;
  Vec out(p.batch * p.groups() * t.nnz() * bs * bs, 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t g = 0; g < p.groups(); ++g)
      for (int64_t z = 0; z < t.nnz(); ++z) {
        const int64_t head = g * t.layout_heads + t.blocks[3 * z];
        const int64_t I = t.blocks[3 * z + 1], J = t.blocks[3 * z + 2];
        for (int64_t r = 0; r < bs; ++r)
          for (int64_t c = 0; c < bs; ++c) {
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d)
              dot += a[p.dense(b, I * bs + r, head, D) + d] * bmat[p.dense(b, J * bs + c, head, D) + d];
            out[p.sparse(b, g, z) + r * bs + c] = dot;
          }
      }
  return out;
}

// Dsd: out_I = sum_z P_z X_J; DsdT (transposed): out_J = sum_z P_z^T X_I.
inline Vec RefDsd(const RefProblem& p, const Vec& probs, const Vec& x, bool transposed) {
  const HostTables& t = *p.t;
  const int64_t bs = t.block, D = p.head_dim;
  Vec out(x.size(), 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t g = 0; g < p.groups(); ++g)
      for (int64_t z = 0; z < t.nnz(); ++z) {
        const int64_t head = g * t.layout_heads + t.blocks[3 * z];
        const int64_t I = t.blocks[3 * z + 1], J = t.blocks[3 * z + 2];
        const double* tile = &probs[p.sparse(b, g, z)];
        for (int64_t r = 0; r < bs; ++r)
          for (int64_t c = 0; c < bs; ++c) {
            const double w = tile[r * bs + c];
            const int64_t dst = transposed ? J * bs + c : I * bs + r;
            const int64_t src = transposed ? I * bs + r : J * bs + c;
            for (int64_t d = 0; d < D; ++d)
              out[p.dense(b, dst, head, D) + d] += w * x[p.dense(b, src, head, D) + d];
          }
      }
  return out;
}

// y = softmax(scale * x) over the visible elements of each query row.
inline Vec RefSoftmax(const RefProblem& p, const Vec& x) {
  const HostTables& t = *p.t;
  const int64_t bs = t.block, nb = t.num_blocks();
  Vec y(x.size(), 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t g = 0; g < p.groups(); ++g)
      for (int64_t row = 0; row < t.layout_heads * nb; ++row)
        for (int64_t i = 0; i < bs; ++i) {
          double mx = -std::numeric_limits<double>::infinity();
          for (int pass = 0; pass < 3; ++pass) {
            double sum = 0.0;
            for (int64_t z = t.row_offsets[row]; z < t.row_offsets[row + 1]; ++z) {
              const int64_t off = p.sparse(b, g, z) + i * bs, j0 = int64_t(t.blocks[3 * z + 2]) * bs;
              for (int64_t c = 0; c < bs; ++c) {
                if (!t.kept(z, i, c) || !p.key_real(b, j0 + c)) continue;
                const double s = p.scale * x[off + c];
                if (pass == 0) mx = std::max(mx, s);
                if (pass == 1) sum += std::exp(s - mx);
                if (pass == 2) y[off + c] = std::exp(s - mx);
              }
            }
            if (pass == 1) mx += std::log(sum);  // pass 2 then gives exp(s - lse)
          }
        }
  return y;
}

// dx = scale * y * (dy - sum_row(y * dy)), rows of row_offsets (any head).
inline Vec RefSoftmaxGrad(const RefProblem& p, const Vec& y, const Vec& dy) {
  const HostTables& t = *p.t;
  const int64_t bs = t.block, rows = t.layout_heads * t.num_blocks();
  Vec dx(y.size(), 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t g = 0; g < p.groups(); ++g)
      for (int64_t row = 0; row < rows; ++row)
        for (int64_t i = 0; i < bs; ++i) {
          double dot = 0.0;
          for (int64_t z = t.row_offsets[row]; z < t.row_offsets[row + 1]; ++z)
            for (int64_t c = 0; c < bs; ++c) {
              const int64_t e = p.sparse(b, g, z) + i * bs + c;
              dot += y[e] * dy[e];
            }
          for (int64_t z = t.row_offsets[row]; z < t.row_offsets[row + 1]; ++z)
            for (int64_t c = 0; c < bs; ++c) {
              const int64_t e = p.sparse(b, g, z) + i * bs + c;
              dx[e] = p.scale * y[e] * (dy[e] - dot);
            }
        }
  return dx;
}

}  // namespace harness
}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_GPU_HARNESS_REFERENCE_H_
