// Routing plan of one chunk of tokens: (token, slot) pairs grouped per expert.
#pragma once
#include <cstdint>
#include <vector>

namespace ktrans {

struct MoePlan {
  std::vector<int32_t> count;   // [E] positions routed to each expert
  std::vector<int32_t> active;  // [A] experts with at least one position, ascending
  std::vector<int64_t> offset;  // [A + 1] first position of each active expert
  std::vector<int32_t> tok;     // [P] chunk-local token of each position
  std::vector<float> wt;        // [P] routing weight of each position

  int64_t num_active() const { return static_cast<int64_t>(active.size()); }
  int64_t num_positions() const { return offset.empty() ? 0 : offset.back(); }
  // Builds the plan for tokens [t0, t0 + tc) of ids/weights ([T, k]). Negative ids are skipped;
  // an id >= E throws std::invalid_argument naming the token and the id. Vectors keep their
  // capacity between calls (no allocation once warm).
  void build(const void* ids, bool ids_i64, const float* weights, int64_t k, int64_t E, int64_t t0,
             int64_t tc);
};

}  // namespace ktrans
