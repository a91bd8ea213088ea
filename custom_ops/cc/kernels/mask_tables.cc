#include "custom_ops/cc/kernels/mask_tables.h"

#include <limits>

namespace sparse_attention {
namespace {

std::string Dims(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

std::string Range(const int32_t* r) {
  return "[" + std::to_string(r[0]) + ", " + std::to_string(r[1]) + ")";
}

// "" if r = [lo, hi) is a valid range of a b x b tile, else why not.
std::string RangeProblem(const int32_t* r, int64_t block) {
  if (r[0] < 0 || r[1] > block)
    return " is out of [0, " + std::to_string(block) + "]";
  if (r[0] % 16 != 0 || r[1] % 16 != 0) return " is not made of multiples of 16";
  if (r[0] > r[1]) return " has lo > hi";
  return "";
}

bool Covers(const int32_t* r, int64_t x) { return r[0] <= x && x < r[1]; }

}  // namespace

std::string ValidateMaskTableShapes(int64_t num_masks, int64_t block,
                                    const std::vector<int64_t>& key_range,
                                    const std::vector<int64_t>& query_range,
                                    const std::vector<int64_t>& split) {
  const std::string m = std::to_string(num_masks), g = std::to_string(block / 16);
  if (key_range != std::vector<int64_t>{num_masks, 2})
    return "mask_key_range must have shape [" + m + ", 2] (num_masks, [lo, hi)), got " +
           Dims(key_range);
  if (query_range != std::vector<int64_t>{num_masks, block / 16, 2})
    return "mask_query_range must have shape [" + m + ", " + g +
           ", 2] (num_masks, block_size / 16, [lo, hi)), got " + Dims(query_range);
  if (split != std::vector<int64_t>{num_masks})
    return "mask_split must have shape [" + m + "] (num_masks), got " + Dims(split);
  return "";
}

std::string ValidateMaskTables(const bool* masks, int64_t num_masks, int64_t block,
                               const int32_t* key_range, const int32_t* query_range,
                               const bool* split) {
  const int64_t groups = block / 16;
  for (int64_t m = 0; m < num_masks; ++m) {
    const int32_t* kr = key_range + 2 * m;
    std::string err = RangeProblem(kr, block);
    if (!err.empty())
      return "mask_key_range[" + std::to_string(m) + "] = " + Range(kr) + err;
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t* qr = query_range + 2 * (m * groups + g);
      err = RangeProblem(qr, block);
      if (!err.empty())
        return "mask_query_range[" + std::to_string(m) + ", " + std::to_string(g) +
               "] = " + Range(qr) + err;
    }
    const bool* tile = masks + m * block * block;  // [query i][key j]
    for (int64_t i = 0; i < block; ++i)
      for (int64_t j = 0; j < block; ++j) {
        if (!tile[i * block + j]) continue;
        const std::string seen = std::to_string(j) + " of masks[" + std::to_string(m) + "]";
        if (!Covers(kr, j))
          return "mask_key_range[" + std::to_string(m) + "] = " + Range(kr) +
                 " does not cover key " + seen + ", which query " + std::to_string(i) + " sees";
        const int32_t* qr = query_range + 2 * (m * groups + j / 16);
        if (split[m] && !Covers(qr, i))
          return "mask_query_range[" + std::to_string(m) + ", " + std::to_string(j / 16) +
                 "] = " + Range(qr) + " does not cover query " + std::to_string(i) +
                 ", which sees key " + seen + " (mask_split[" + std::to_string(m) + "] is true)";
      }
  }
  return "";
}

void BuildTileBias(const bool* masks, int64_t num_masks, int64_t block, float* bias_t) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t m = 0; m < num_masks; ++m) {
    const bool* tile = masks + m * block * block;  // [query i][key j]
    float* bias = bias_t + m * block * block;      // [key j][query i]
    for (int64_t i = 0; i < block; ++i)
      for (int64_t j = 0; j < block; ++j) bias[j * block + i] = tile[i * block + j] ? 0.f : kNegInf;
  }
}

}  // namespace sparse_attention
