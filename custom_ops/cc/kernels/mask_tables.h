// The tile-mask tables of the fused attention, framework-free: the checks of
// what layout.py derives once per (pattern, seq_len, block size) from the
// tile masks, and the float bias the CPU kernels read.
//
// Letters: M tile masks, b block size (a multiple of 16), groups of 16 keys
// g = 0 .. b/16 - 1 (keys 16g .. 16g + 15). masks [M, b, b] is bool at
// [query i][key j], true: visible.
//   mask_key_range   [M, 2]        int32, per mask the keys [lo, hi) some query
//                                  sees ((0, 0): no query sees anything)
//   mask_query_range [M, b/16, 2]  int32, per mask and key group the queries
//                                  [lo, hi) that see any of its keys ((0, 0): none)
//   mask_split       [M]           bool, true if the kernels compute the tile
//                                  group by group on the queries of its query range
// Every lo and hi is a multiple of 16 in [0, b]. The kernels compute only
// what these ranges cover, so each must cover every visible element; wider
// ranges are valid (they only cost time).
#ifndef SPARSE_ATTENTION_TF_KERNELS_MASK_TABLES_H_
#define SPARSE_ATTENTION_TF_KERNELS_MASK_TABLES_H_

#include <cstdint>
#include <string>
#include <vector>

namespace sparse_attention {

// "" if the shapes (dimension lists) of mask_key_range, mask_query_range and
// mask_split fit num_masks masks of b x b, else a message naming the table.
std::string ValidateMaskTableShapes(int64_t num_masks, int64_t block,
                                    const std::vector<int64_t>& key_range,
                                    const std::vector<int64_t>& query_range,
                                    const std::vector<int64_t>& split);

// "" if every range is a multiple of 16 in [0, b] with lo <= hi, and covers
// the visible elements of its mask: every visible (i, j) of masks[m] has j in
// key_range[m] and, where split[m], i in query_range[m, j / 16]. Else a
// message naming the table, the mask and the element. Shapes as
// ValidateMaskTableShapes accepts.
std::string ValidateMaskTables(const bool* masks, int64_t num_masks, int64_t block,
                               const int32_t* key_range, const int32_t* query_range,
                               const bool* split);

// bias_t [M, b, b] at [key j][query i]: 0 where masks[m][i][j] is visible,
// -inf where hidden (the transposed additive mask the CPU kernels read).
void BuildTileBias(const bool* masks, int64_t num_masks, int64_t block, float* bias_t);

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_MASK_TABLES_H_
