// Lookup tables of the paper's patterns in plain C++ (no TensorFlow, no
// Python): the harness's twin of sparse_attention_tf/layout.py and the
// Fixed / Strided patterns of sparse_attention_tf/patterns.py.
//
// tests/test_gpu.py holds these tables equal to the Python plans (through
// tables_dump.cc): same blocks, row/column lists and per-block tiles. Only
// the numbering of the distinct partial tiles (masks) may differ.
//
// Letters as in custom_ops/cuda/blocksparse_gpu.h.
#ifndef SPARSE_ATTENTION_TF_GPU_HARNESS_TABLES_H_
#define SPARSE_ATTENTION_TF_GPU_HARNESS_TABLES_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace sparse_attention {
namespace harness {

struct HostTables {
  int64_t seq_len = 0, block = 0, layout_heads = 1;
  std::vector<int32_t> blocks;       // [Z, 3] (h, I, J), sorted by (h, I, J)
  std::vector<int32_t> row_offsets;  // [Hl*Nb + 1]
  std::vector<int32_t> col_offsets;  // [Hl*Nb + 1]
  std::vector<int32_t> col_blocks;   // [Z], sorted by (h, J, I)
  std::vector<int32_t> mask_index;   // [Z], -1: full tile
  std::vector<uint8_t> masks;        // [M, b, b]
  int64_t num_masks = 0;

  int64_t nnz() const { return int64_t(mask_index.size()); }
  int64_t num_blocks() const { return seq_len / block; }
  // Is element (query row qi, key column kj) of block z kept?
  bool kept(int64_t z, int64_t qi, int64_t kj) const {
    const int32_t mi = mask_index[z];
    return mi < 0 || masks[(mi * block + qi) * block + kj] != 0;
  }
};

// Builds the tables from a tile function: tile(h, I, J, out) writes the b*b
// element mask of block (I, J) of layout head h into out (row-major, query
// rows). Blocks with at least one kept element are kept.
template <typename TileFn>
HostTables FromTiles(int64_t layout_heads, int64_t seq_len, int64_t block, TileFn tile) {
  if (seq_len % block != 0) throw std::invalid_argument("seq_len must be a multiple of block");
  HostTables t;
  t.seq_len = seq_len;
  t.block = block;
  t.layout_heads = layout_heads;
  const int64_t nb = seq_len / block, bb = block * block;
  std::vector<uint8_t> buf(bb);
  std::map<std::vector<uint8_t>, int32_t> classes;  // distinct partial tiles
  t.row_offsets.push_back(0);
  for (int64_t h = 0; h < layout_heads; ++h)
    for (int64_t i = 0; i < nb; ++i) {
      for (int64_t j = 0; j < nb; ++j) {
        tile(h, i, j, buf.data());
        const int64_t ones = std::count(buf.begin(), buf.end(), uint8_t(1));
        if (ones == 0) continue;
        t.blocks.insert(t.blocks.end(), {int32_t(h), int32_t(i), int32_t(j)});
        if (ones == bb) {
          t.mask_index.push_back(-1);
          continue;
        }
        auto it = classes.find(buf);
        if (it == classes.end()) {
          it = classes.emplace(buf, int32_t(t.num_masks++)).first;
          t.masks.insert(t.masks.end(), buf.begin(), buf.end());
        }
        t.mask_index.push_back(it->second);
      }
      t.row_offsets.push_back(int32_t(t.mask_index.size()));
    }
  // Column lists: block ids sorted by (h, J, I).
  const int64_t z_count = t.nnz();
  t.col_blocks.resize(z_count);
  std::iota(t.col_blocks.begin(), t.col_blocks.end(), 0);
  auto col_key = [&](int32_t z) {
    return (int64_t(t.blocks[3 * z]) * nb + t.blocks[3 * z + 2]) * nb + t.blocks[3 * z + 1];
  };
  std::sort(t.col_blocks.begin(), t.col_blocks.end(),
            [&](int32_t a, int32_t b) { return col_key(a) < col_key(b); });
  t.col_offsets.assign(layout_heads * nb + 1, 0);
  for (int64_t z = 0; z < z_count; ++z)
    ++t.col_offsets[1 + t.blocks[3 * z] * nb + t.blocks[3 * z + 2]];
  for (int64_t c = 0; c < layout_heads * nb; ++c) t.col_offsets[c + 1] += t.col_offsets[c];
  return t;
}

// Tables of an element predicate keep(h, i, j) that depends only on
// (i mod period, i - j) (windows, strides, causality): each distinct tile is
// evaluated once, as layout.tables_from_keep(..., period=...) does.
template <typename Keep>
HostTables FromPeriodicKeep(Keep keep, int64_t layout_heads, int64_t seq_len, int64_t block,
                            int64_t period) {
  const int64_t p = std::lcm(period, block) / block;  // block rows per period
  const int64_t nb = seq_len / block;
  std::unordered_map<int64_t, std::vector<uint8_t>> cache;
  int64_t cached_head = -1;
  return FromTiles(layout_heads, seq_len, block, [&](int64_t h, int64_t bi, int64_t bj, uint8_t* out) {
    if (h != cached_head) {
      cache.clear();
      cached_head = h;
    }
    const int64_t key = (bi % p) * (2 * nb) + (bi - bj + nb);
    auto it = cache.find(key);
    if (it == cache.end()) {
      std::vector<uint8_t> tile(block * block);
      for (int64_t a = 0; a < block; ++a)
        for (int64_t c = 0; c < block; ++c)
          tile[a * block + c] = keep(h, bi * block + a, bj * block + c) ? 1 : 0;
      it = cache.emplace(key, std::move(tile)).first;
    }
    std::copy(it->second.begin(), it->second.end(), out);
  });
}

// patterns.Fixed(stride, summary, head_groups=g, mode="merged", causal): query
// i sees key j iff j <= i and (j // l == i // l or j is a summary position
// of head group r = h % g: l - (r+1)c <= j % l <= l - r*c - 1). One layout
// head per head group.
inline HostTables FixedTables(int64_t stride, int64_t summary, int64_t head_groups, bool causal,
                              int64_t seq_len, int64_t block) {
  if (stride % block != 0) throw std::invalid_argument("Fixed: stride must be a multiple of block");
  auto keep = [=](int64_t h, int64_t i, int64_t j) {
    const int64_t l = stride, c = summary, r = h % head_groups, jm = j % l;
    const bool window = j / l == i / l;
    const bool sum = jm >= l - (r + 1) * c && jm <= l - r * c - 1;
    return (window || sum) && (!causal || j <= i);
  };
  return FromPeriodicKeep(keep, head_groups, seq_len, block, stride);
}

// patterns.Strided(stride, mode="merged", causal): A1 (the previous l
// positions; |i - j| < l if not causal) or A2 ((i - j) % l == 0, j <= i if causal).
inline HostTables StridedTables(int64_t stride, bool causal, int64_t seq_len, int64_t block) {
  auto keep = [=](int64_t, int64_t i, int64_t j) {
    const int64_t d = i - j;
    const bool a1 = causal ? (d >= 0 && d < stride) : (d > -stride && d < stride);
    const bool a2 = d % stride == 0 && (!causal || j <= i);
    return a1 || a2;
  };
  return FromPeriodicKeep(keep, 1, seq_len, block, 1);
}

// A random layout: each block kept with probability `density`; kept tiles
// are full, causal-diagonal or random (some tile rows all false), so rows
// with no visible key and partial tiles are both exercised.
inline HostTables RandomTables(int64_t layout_heads, int64_t seq_len, int64_t block,
                               double density, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  return FromTiles(layout_heads, seq_len, block, [&](int64_t, int64_t, int64_t, uint8_t* out) {
    const int64_t bb = block * block;
    std::fill(out, out + bb, uint8_t(0));
    if (u(rng) >= density) return;
    const double kind = u(rng);
    for (int64_t a = 0; a < block; ++a)
      for (int64_t c = 0; c < block; ++c) {
        uint8_t v = 1;
        if (kind < 0.3) v = c <= a;                                   // causal diagonal
        else if (kind < 0.6) v = (a % 7 != 3) && u(rng) < 0.6;        // random, empty rows
        out[a * block + c] = v;
      }
    if (std::count(out, out + bb, uint8_t(1)) == 0) out[0] = 1;
  });
}

}  // namespace harness
}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_GPU_HARNESS_TABLES_H_
