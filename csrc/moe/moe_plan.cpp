// Counting sort of the (token, slot) pairs by expert: O(tc * k + E), single-threaded (a few µs
// at decode, well under a millisecond for an 8192-token chunk).
#include "moe/moe_plan.h"

#include <stdexcept>
#include <string>

namespace ktrans {

void MoePlan::build(const void* ids, bool ids_i64, const float* weights, int64_t k, int64_t E,
                    int64_t t0, int64_t tc) {
  auto id_at = [&](int64_t i) -> int64_t {
    return ids_i64 ? static_cast<const int64_t*>(ids)[i] : static_cast<const int32_t*>(ids)[i];
  };
  count.assign(E, 0);
  for (int64_t i = t0 * k; i < (t0 + tc) * k; ++i) {
    int64_t e = id_at(i);
    if (e < 0) continue;
    if (e >= E)
      throw std::invalid_argument("expert id " + std::to_string(e) + " of token " + std::to_string(i / k) +
                                  " is out of range: the layer has " + std::to_string(E) + " experts");
    ++count[e];
  }
  active.clear();
  offset.assign(1, 0);
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    active.push_back(static_cast<int32_t>(e));
    offset.push_back(offset.back() + count[e]);
  }
  // count[] becomes the next free position of each expert.
  for (size_t a = 0; a < active.size(); ++a) count[active[a]] = static_cast<int32_t>(offset[a]);
  tok.resize(offset.back());
  wt.resize(offset.back());
  for (int64_t i = t0 * k; i < (t0 + tc) * k; ++i) {
    int64_t e = id_at(i);
    if (e < 0) continue;
    int32_t p = count[e]++;
    tok[p] = static_cast<int32_t>(i / k - t0);
    wt[p] = weights[i];
  }
}

}  // namespace ktrans
