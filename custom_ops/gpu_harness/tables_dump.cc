// Prints the C++ tables of one pattern, for tests/test_gpu.py to compare with
// the Python plans (CPU only, built with g++):
//   tables_dump fixed STRIDE SUMMARY HEAD_GROUPS CAUSAL SEQ BLOCK
//   tables_dump strided STRIDE CAUSAL SEQ BLOCK
// Output: a header line, one line per table, then one line per block: "F" for
// a full tile, else its b*b elements as 0/1 (query rows first).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "custom_ops/gpu_harness/tables.h"

namespace {

void PrintList(const char* name, const std::vector<int32_t>& v) {
  std::printf("%s", name);
  for (int32_t x : v) std::printf(" %d", x);
  std::printf("\n");
}

int Usage() {
  std::fprintf(stderr,
               "usage: tables_dump fixed STRIDE SUMMARY HEAD_GROUPS CAUSAL SEQ BLOCK\n"
               "       tables_dump strided STRIDE CAUSAL SEQ BLOCK\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sparse_attention::harness;
  if (argc < 2) return Usage();
  std::vector<long long> a;
  for (int i = 2; i < argc; ++i) a.push_back(std::atoll(argv[i]));
  HostTables t;
  if (std::strcmp(argv[1], "fixed") == 0 && a.size() == 6) {
    t = FixedTables(a[0], a[1], a[2], a[3] != 0, a[4], a[5]);
  } else if (std::strcmp(argv[1], "strided") == 0 && a.size() == 4) {
    t = StridedTables(a[0], a[1] != 0, a[2], a[3]);
  } else {
    return Usage();
  }
  std::printf("seq %lld block %lld layout_heads %lld nnz %lld\n", (long long)t.seq_len,
              (long long)t.block, (long long)t.layout_heads, (long long)t.nnz());
  PrintList("blocks", t.blocks);
  PrintList("row_offsets", t.row_offsets);
  PrintList("col_offsets", t.col_offsets);
  PrintList("col_blocks", t.col_blocks);
  std::string line;
  for (int64_t z = 0; z < t.nnz(); ++z) {
    if (t.mask_index[z] < 0) {
      std::printf("F\n");
      continue;
    }
    line.clear();
    for (int64_t qi = 0; qi < t.block; ++qi)
      for (int64_t kj = 0; kj < t.block; ++kj) line.push_back(t.kept(z, qi, kj) ? '1' : '0');
    std::printf("%s\n", line.c_str());
  }
  return 0;
}
