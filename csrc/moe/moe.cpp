// MoE layer: construction (NUMA geometry, kernel selection), weight loading into per-group
// stores, and the chunk loop; the forward phases are in moe_forward.cpp. See moe.h.
#include "moe/moe.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ktrans {
namespace {

// [begin, end) of part i of n equal parts of [0, len).
inline void split_range(int64_t len, int i, int n, int64_t* b, int64_t* e) {
  *b = len * i / n;
  *e = len * (i + 1) / n;
}

std::string type_name(QType t) { return qtype_traits(t).name; }

}  // namespace

MoeLayer::MoeLayer(std::shared_ptr<ThreadPool> pool, const MoeShape& s, MoeBackend backend, NumaMode numa,
                   Isa isa, int64_t max_chunk)
    : pool_(std::move(pool)), shape_(s), backend_(backend), numa_(numa), isa_(isa),
      max_chunk_(std::max<int64_t>(1, max_chunk)), buf_(moe_scratch_for(pool_.get())),
      counters_(pool_->num_groups()) {
  if (s.E <= 0 || s.H <= 0 || s.I <= 0) throw std::invalid_argument("MoE shape E, H, I must be positive");
  if (isa_ != Isa::amx) gemm_min_tokens_ = 0;
  const int G = ngroups();
  const int64_t proj_k[3] = {s.H, s.H, s.I};
  for (int p = 0; p < 3; ++p) {
    const QTypeTraits& tr = qtype_traits(s.types[p]);
    if (proj_k[p] % tr.block_size != 0)
      throw std::invalid_argument(std::string("MoE ") + (p == 2 ? "down" : p ? "up" : "gate") + " weights in " +
                                  tr.name + " need rows of a multiple of " + std::to_string(tr.block_size) +
                                  " values, got " + std::to_string(proj_k[p]));
  }
  // Gate/up row ranges per group; in split mode cut at block boundaries of the down format (the
  // down slice of group g is these columns) and of the packed formats' K groups.
  const bool packed = backend_ != MoeBackend::gguf;
  if (packed && (s.H % kPackKAlign || s.I % kPackKAlign))
    throw std::invalid_argument("the " + std::string(packed_format_name(packed_format(backend_))) +
                                " packed MoE backend needs H and I multiples of " + std::to_string(kPackKAlign) +
                                ", got H=" + std::to_string(s.H) + ", I=" + std::to_string(s.I));
  // NOTE: block sizes are 1, 32 or 256, so the larger one is a multiple of the other. Packed
  // formats cut at kPackKAlign in both modes, so every group's columns start on a whole panel.
  const int64_t align = numa_ == NumaMode::split
                            ? std::max<int64_t>(qtype_traits(s.types[2]).block_size, packed ? kPackKAlign : 1)
                            : (packed ? kPackKAlign : 1);
  const int64_t nb = s.I / align;
  for (int g = 0; g <= G; ++g) row_begin_.push_back(nb * g / G * align + (g == G ? s.I - nb * align : 0));
  if (!packed) {
    for (int p = 0; p < 3; ++p) {
      QType t = s.types[p];
      dot_[p] = k_vec_dot[qi(t)].get(isa_);
      multi_[p] = k_moe_dot_multi[qi(t)].get(isa_);
      act_type_[p] = vec_dot_type(t);
      act_quant_[p] = k_quantize_row[qi(act_type_[p])].get(isa_);
      if (!dot_[p] || (act_type_[p] != QType::f32 && !act_quant_[p]))
        throw std::invalid_argument("no " + type_name(t) + " dot-product kernel for the MoE gguf backend");
      act_bytes_[p] = qtype_row_bytes(act_type_[p], proj_k[p]);
    }
  }
  for (int p = 0; p < 3; ++p) {
    store_[p].resize(G);
    for (int g = 0; g < G; ++g) {
      ProjStore& st = store_[p][g];
      int64_t len = numa_ == NumaMode::split ? row_begin_[g + 1] - row_begin_[g] : s.I;
      st.rows = p < 2 ? len : s.H;
      st.k = p < 2 ? s.H : len;
      st.row_bytes = qtype_row_bytes(s.types[p], st.k);
      st.expert_bytes = packed ? static_cast<int64_t>(packed_bytes(packed_format(backend_), st.rows, st.k))
                               : st.rows * st.row_bytes;
      st.mem = Region(static_cast<size_t>(st.expert_bytes * s.E), pool_->group_node(g));
    }
  }
}

int64_t MoeLayer::weight_bytes() const {
  int64_t n = 0;
  for (int p = 0; p < 3; ++p)
    for (const ProjStore& st : store_[p]) n += static_cast<int64_t>(st.mem.size());
  return n;
}

int64_t moe_weight_bytes(const MoeShape& s, MoeBackend b, NumaMode numa, int ngroups) {
  const int64_t copies = numa == NumaMode::replicate ? ngroups : 1;
  int64_t per_copy = 0;
  for (int p = 0; p < 3; ++p) {
    int64_t rows = p < 2 ? s.I : s.H, k = p < 2 ? s.H : s.I;
    per_copy += s.E * (b == MoeBackend::gguf ? rows * qtype_row_bytes(s.types[p], k)
                                             : static_cast<int64_t>(packed_bytes(packed_format(b), rows, k)));
  }
  return per_copy * copies;
}

void MoeLayer::load(int proj, int64_t e0, int64_t e1, const uint8_t* src) {
  if (proj < 0 || proj > 2) throw std::invalid_argument("projection must be 0 (gate), 1 (up) or 2 (down)");
  if (e0 < 0 || e1 > shape_.E || e0 >= e1) throw std::invalid_argument("expert range out of bounds");
  pool_->parallel([&](int ith, int nth) {
    // Each group copies into its own memory with its own threads (first touch stays local).
    int g = pool_->group_of(ith);
    if (backend_ == MoeBackend::gguf)
      load_group(proj, g, e0, e1, src, ith - pool_->group_begin(g), pool_->group_size(g));
    else
      load_group_packed(proj, g, e0, e1, src, ith - pool_->group_begin(g), pool_->group_size(g));
  });
}

void MoeLayer::load_group(int proj, int g, int64_t e0, int64_t e1, const uint8_t* src, int ith, int nth) {
  const ProjStore& st = store_[proj][g];
  const int64_t full_rows = proj < 2 ? shape_.I : shape_.H, full_k = proj < 2 ? shape_.H : shape_.I;
  const int64_t src_row = qtype_row_bytes(shape_.types[proj], full_k);
  const bool sliced = numa_ == NumaMode::split;
  const int64_t r0 = sliced && proj < 2 ? row_begin_[g] : 0;  // first source row (gate/up slice)
  const int64_t c0 = sliced && proj == 2 ? row_begin_[g] : 0;  // first source column (down slice)
  int64_t b, e;
  split_range(e1 - e0, ith, nth, &b, &e);
  for (int64_t x = e0 + b; x < e0 + e; ++x) {
    const uint8_t* s = src + (x - e0) * full_rows * src_row;
    uint8_t* d = const_cast<uint8_t*>(st.expert(x));
    const int64_t col_off = qtype_row_bytes(shape_.types[proj], c0);
    for (int64_t r = 0; r < st.rows; ++r)
      std::memcpy(d + r * st.row_bytes, s + (r0 + r) * src_row + col_off, st.row_bytes);
  }
}

void MoeLayer::forward(const MoeArgs& a) {
  for (int64_t t0 = 0; t0 < a.T; t0 += max_chunk_) {
    const int64_t tc = std::min(max_chunk_, a.T - t0);
    if (backend_ == MoeBackend::gguf)
      forward_chunk(a, t0, tc);
    else
      forward_chunk_packed(a, t0, tc);
  }
}

}  // namespace ktrans
