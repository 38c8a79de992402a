// Python bindings of the fused CPU decode step (decoder.h). ktrans/operators/cpu_decode.py builds
// a plan once from a loaded model (every array it passes is checked here and kept alive by the
// plan); step() then runs a decode-only engine step as one pool task with the GIL released,
// after checking every id, position and page it will index with.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "decode/decode_impl.h"
#include "decode/decoder.h"

namespace ktrans {
namespace {

using Array = py::array;
using Shape = std::vector<int64_t>;

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// A decoder that owns (a reference to) every array its plan points into.
struct PyDecoder : CpuDecoder {
  using CpuDecoder::CpuDecoder;
  std::vector<py::object> keep;
  ~PyDecoder() {
    py::gil_scoped_acquire gil;
    keep.clear();
  }
  template <class T>
  T* take(const Array& a, const char* name, const Shape& shape, bool writeable = false) {
    if (!a.dtype().is(py::dtype::of<T>()) || !(a.flags() & py::array::c_style))
      bad(std::string(name) + " must be a C-contiguous " + (sizeof(T) == 4 ? "float32" : "uint8") + " array");
    Shape got(a.shape(), a.shape() + a.ndim());
    if (got != shape) bad(std::string(name) + " has shape " + shape_str(got) + ", expected " + shape_str(shape));
    if (writeable && !a.writeable()) bad(std::string(name) + " must be writeable");
    keep.push_back(a);
    return static_cast<T*>(const_cast<void*>(a.data()));
  }
  const float* vec(py::object o, const char* name, int64_t n) {
    return o.is_none() ? nullptr : take<float>(o.cast<Array>(), name, {n});
  }
};

// NOTE: every part must fan out on the decoder's pool: parallel() is only valid inside a task of
// the pool it is called on, and the step is one task of the decoder's pool.
std::shared_ptr<QLinear> lin(const CpuDecoder& d, py::object o, const char* name, int64_t N, int64_t K) {
  if (o.is_none()) return nullptr;
  auto l = o.cast<std::shared_ptr<QLinear>>();
  if (l->pool() != d.pool()) bad(std::string(name) + " runs on another thread pool than the decoder");
  if ((N >= 0 && l->N() != N) || l->K() != K)
    bad(std::string(name) + " is [" + std::to_string(l->N()) + ", " + std::to_string(l->K()) + "], expected [" +
        (N >= 0 ? std::to_string(N) : std::string("any")) + ", " + std::to_string(K) + "]");
  return l;
}

// `partial`: the table may cover only the first dims of a `dim`-wide head (GLM-4.5's partial
// rotary; CpuDecoder::rope rotates 2 * half dims of each head and leaves the rest).
void check_rope(const PyDecoder& d, int rope, int64_t dim, bool partial = false) {
  if (rope < 0 || rope >= d.num_ropes()) bad("rope table " + std::to_string(rope) + " was not added");
  const int64_t covered = 2 * d.rope_table(rope).half;
  if (dim % 2 || dim > 512 || covered > dim || (!partial && covered != dim))
    bad("rope table covers " + std::to_string(covered) + " dims, the layer rotates " +
        (partial ? "at most " : "") + std::to_string(dim));
}

int64_t add_gqa(PyDecoder& d, Array an, Array fn, float eps, int rope, py::object q, py::object k, py::object v,
                py::object o, py::object qn, py::object kn, int64_t hq, int64_t hkv, int64_t hd, float scale,
                Array kc, Array vc) {
  const int64_t H = d.hidden();
  if (hq <= 0 || hkv <= 0 || hq % hkv || hd <= 0) bad("GQA heads must satisfy hq % hkv == 0, head_dim > 0");
  check_rope(d, rope, hd, true);
  Layer L;
  L.attn_norm = d.take<float>(an, "input_layernorm", {H});
  L.ffn_norm = d.take<float>(fn, "post_attention_layernorm", {H});
  L.eps = eps, L.rope = rope;
  GqaAttn& g = L.gqa;
  g.q = lin(d, q, "q_proj", hq * hd, H), g.k = lin(d, k, "k_proj", hkv * hd, H), g.v = lin(d, v, "v_proj", hkv * hd, H);
  g.o = lin(d, o, "o_proj", H, hq * hd);
  if (!g.q || !g.k || !g.v || !g.o) bad("GQA needs q_proj, k_proj, v_proj and o_proj");
  // Qwen3 normalizes q/k per head ([hd]); MiniMax-M2 over all heads of a token ([hq * hd], [hkv * hd]).
  const bool whole = !qn.is_none() && hq > 1 && qn.cast<Array>().size() == hq * hd;
  g.q_norm = d.vec(qn, "q_norm", whole ? hq * hd : hd), g.k_norm = d.vec(kn, "k_norm", whole ? hkv * hd : hd);
  g.qk_norm_whole = whole;
  g.hq = hq, g.hkv = hkv, g.d = hd, g.scale = scale, g.eps = eps;
  g.kc = d.take<float>(kc, "K cache", {d.num_slots(), hkv, hd}, true);
  g.vc = d.take<float>(vc, "V cache", {d.num_slots(), hkv, hd}, true);
  return d.add_layer(std::move(L));
}

int64_t add_mla(PyDecoder& d, Array an, Array fn, float eps, int rope, py::object q, py::object q_a,
                py::object q_a_norm, py::object q_b, py::object kv_a, Array kv_norm, Array w_uk, Array w_uv,
                py::object o, int64_t h, int64_t dn, int64_t dr, int64_t dv, int64_t r, float scale, Array cache) {
  const int64_t H = d.hidden();
  check_rope(d, rope, dr);
  Layer L;
  L.mla = true;
  L.attn_norm = d.take<float>(an, "input_layernorm", {H});
  L.ffn_norm = d.take<float>(fn, "post_attention_layernorm", {H});
  L.eps = eps, L.rope = rope;
  MlaAttn& m = L.mla_attn;
  m.h = h, m.dn = dn, m.dr = dr, m.dv = dv, m.r = r, m.scale = scale, m.eps = eps;
  if (q_a.is_none()) {
    m.q = lin(d, q, "q_proj", h * (dn + dr), H);
    if (!m.q) bad("MLA needs q_proj or q_a_proj + q_b_proj");
  } else {
    m.q_a = lin(d, q_a, "q_a_proj", -1, H);
    m.q_a_norm = d.vec(q_a_norm, "q_a_layernorm", m.q_a->N());
    m.q_b = lin(d, q_b, "q_b_proj", h * (dn + dr), m.q_a->N());
    if (!m.q_a_norm || !m.q_b) bad("MLA with q_a_proj needs q_a_layernorm and q_b_proj");
  }
  m.kv_a = lin(d, kv_a, "kv_a_proj_with_mqa", r + dr, H);
  m.kv_norm = d.take<float>(kv_norm, "kv_a_layernorm", {r});
  m.w_uk = d.take<float>(w_uk, "w_uk", {h, dn, r});
  m.w_uv = d.take<float>(w_uv, "w_uv", {h, dv, r});
  m.o = lin(d, o, "o_proj", H, h * dv);
  if (!m.kv_a || !m.o) bad("MLA needs kv_a_proj_with_mqa and o_proj");
  m.cache = d.take<float>(cache, "latent cache", {d.num_slots(), r + dr}, true);
  return d.add_layer(std::move(L));
}

void set_dense(PyDecoder& d, int64_t i, py::object gate, py::object up, py::object down, const std::string& act) {
  if (i < 0 || i >= d.num_layers()) bad("layer " + std::to_string(i) + " was not added");
  if (act != "silu" && act != "gelu_tanh") bad("dense MLP activation must be 'silu' or 'gelu_tanh', got '" + act + "'");
  Mlp& m = d.layer(i).mlp;
  m.gelu = act == "gelu_tanh";
  m.gate = lin(d, gate, "gate_proj", -1, d.hidden());
  if (!m.gate) bad("a dense MLP needs gate_proj, up_proj and down_proj");
  m.up = lin(d, up, "up_proj", m.gate->N(), d.hidden());
  m.down = lin(d, down, "down_proj", d.hidden(), m.gate->N());
  if (!m.up || !m.down) bad("a dense MLP needs gate_proj, up_proj and down_proj");
}

// Gemma 3: the attention output and the MLP output each RMS-normalised (same eps) before their
// residual add; a sliding layer's window.
void set_post_norms(PyDecoder& d, int64_t i, Array attn, Array ffn) {
  if (i < 0 || i >= d.num_layers()) bad("layer " + std::to_string(i) + " was not added");
  d.layer(i).post_attn_norm = d.take<float>(attn, "post_attention_layernorm", {d.hidden()});
  d.layer(i).post_ffn_norm = d.take<float>(ffn, "post_feedforward_layernorm", {d.hidden()});
}

void set_window(PyDecoder& d, int64_t i, int64_t window) {
  if (i < 0 || i >= d.num_layers() || d.layer(i).mla) bad("layer " + std::to_string(i) + " is not a GQA layer");
  if (window < 1) bad("a sliding window must be at least 1 token, got " + std::to_string(window));
  d.layer(i).gqa.window = window;
}

void set_moe(PyDecoder& d, int64_t i, int kind, py::object gate, py::object bias, int64_t k, int64_t n_group,
             int64_t topk_group, bool norm, bool group_limited, float scale, std::shared_ptr<MoeLayer> experts,
             py::object shared_gate_proj, py::object shared_up, py::object shared_down, py::object shared_gate) {
  const int64_t H = d.hidden();
  Mlp& m = d.layer(i).mlp;
  if (kind < 0 || kind > 2) bad("router kind must be 0 (softmax_topk), 1 (deepseek_v2) or 2 (deepseek_v3)");
  if (experts->shape().H != H) bad("experts hidden size differs from the model's");
  if (experts->pool() != d.pool()) bad("experts run on another thread pool than the decoder");
  const int64_t E = experts->shape().E;
  if (k < 1 || k > kMaxTopK || k > E) bad("router top-k must lie in [1, min(E, 16)]");
  if (n_group < 1 || n_group > 64 || E % n_group || topk_group < 1 || topk_group > n_group ||
      (kind == 2 && E / n_group < 2))
    bad("router groups: need 1 <= topk_group <= n_group <= 64 and E % n_group == 0");
  m.moe = true;
  m.router.kind = static_cast<RouteKind>(kind);
  m.router.gate = lin(d, gate, "router", E, H);
  if (!m.router.gate) bad("a MoE layer needs its router");
  m.router.bias = d.vec(bias, "e_score_correction_bias", E);
  if (kind == 2 && !m.router.bias) bad("DeepSeek-V3 routing needs e_score_correction_bias");
  m.router.E = E, m.router.k = k, m.router.n_group = n_group, m.router.topk_group = topk_group;
  m.router.norm = norm, m.router.group_limited = group_limited, m.router.scale = scale;
  m.experts = std::move(experts);
  if (!shared_gate_proj.is_none()) {
    m.gate = lin(d, shared_gate_proj, "shared gate_proj", -1, H);
    m.up = lin(d, shared_up, "shared up_proj", m.gate->N(), H);
    m.down = lin(d, shared_down, "shared down_proj", H, m.gate->N());
    if (!m.up || !m.down) bad("shared experts need gate_proj, up_proj and down_proj");
    m.shared_gate = lin(d, shared_gate, "shared_expert_gate", 1, H);
  }
}

void step_py(PyDecoder& d, Array ids, Array pos, Array pages, Array rows, Array logits) {
  auto i64 = [](const Array& a, const char* name) {
    if (!a.dtype().is(py::dtype::of<int64_t>()) || !(a.flags() & py::array::c_style) || a.ndim() != 1)
      bad(std::string(name) + " must be a C-contiguous 1-D int64 array");
    return static_cast<const int64_t*>(a.data());
  };
  DecodeArgs a;
  a.B = ids.size();
  a.ids = i64(ids, "token ids");
  a.pos = i64(pos, "positions");
  a.rows = i64(rows, "logits rows");
  a.R = rows.size();
  if (a.B < 1 || a.B > kMaxDecodeTokens || pos.size() != a.B)
    bad("a fused decode step takes 1.." + std::to_string(kMaxDecodeTokens) + " tokens with one position each");
  for (int64_t i = 0; i < d.num_layers(); ++i)
    if (!(d.layer(i).mlp.moe ? d.layer(i).mlp.experts != nullptr : d.layer(i).mlp.down != nullptr))
      bad("layer " + std::to_string(i) + " has no MLP");
  if (!d.has_embedding() || d.vocab() == 0) bad("the decoder has no embedding or head");
  if (!pages.dtype().is(py::dtype::of<int32_t>()) || !(pages.flags() & py::array::c_style) || pages.ndim() != 2 ||
      pages.shape(0) != a.B)
    bad("page table must be a C-contiguous int32 [B, max_pages] array");
  a.pages = static_cast<const int32_t*>(pages.data());
  a.max_pages = pages.shape(1);
  const int64_t ps = d.page_size(), num_pages = d.num_slots() / ps;
  for (int64_t b = 0; b < a.B; ++b) {
    if (a.ids[b] < 0 || a.ids[b] >= d.emb_vocab()) bad("token id " + std::to_string(a.ids[b]) + " out of range");
    if (a.pos[b] < 0 || a.pos[b] >= d.max_positions())
      bad("position " + std::to_string(a.pos[b]) + " outside the rotary tables (" + std::to_string(d.max_positions()) + ")");
    const int64_t need = a.pos[b] / ps + 1;
    if (need > a.max_pages) bad("page table too short for position " + std::to_string(a.pos[b]));
    for (int64_t p = 0; p < need; ++p) {
      const int32_t pg = a.pages[b * a.max_pages + p];
      if (pg < 0 || pg >= num_pages) bad("KV page id " + std::to_string(pg) + " out of range");
    }
  }
  for (int64_t r = 0; r < a.R; ++r)
    if (a.rows[r] < 0 || a.rows[r] >= a.B) bad("logits row out of range");
  if (!logits.dtype().is(py::dtype::of<float>()) || !(logits.flags() & py::array::c_style) || logits.ndim() != 2 ||
      logits.shape(0) != a.R || logits.shape(1) != d.vocab() || !logits.writeable())
    bad("logits must be a writeable C-contiguous float32 [R, vocab] array");
  a.logits = static_cast<float*>(logits.mutable_data());
  py::gil_scoped_release release;
  d.pool()->run([&] { d.step(a); });
}

}  // namespace

void bind_decode(py::module_& m) {
  py::class_<PyDecoder, std::shared_ptr<PyDecoder>>(m, "CpuDecoder", "fused all-CPU decode step (csrc/decode/decoder.h)")
      .def(py::init([](std::shared_ptr<ThreadPool> pool, int64_t H, int64_t page_size, int64_t num_slots,
                       const std::string& isa) {
             Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
             if (H <= 0 || page_size <= 0 || num_slots <= 0 || num_slots % page_size) bad("bad decoder geometry");
             return std::make_shared<PyDecoder>(std::move(pool), H, page_size, num_slots, level);
           }),
           py::arg("pool"), py::arg("H"), py::arg("page_size"), py::arg("num_slots"), py::arg("isa") = "")
      .def("set_embedding", [](PyDecoder& d, const std::string& qtype, Array rows, int64_t vocab, float scale) {
        QType t;
        if (!qtype_from_name(qtype.c_str(), &t) || !k_dequantize_row[qi(t)].get() || d.hidden() % qtype_traits(t).block_size)
          bad("embedding format '" + qtype + "' cannot be read");
        if (!std::isfinite(scale)) bad("embedding scale must be finite");
        d.set_embedding(t, d.take<uint8_t>(rows, "embedding", {vocab, qtype_row_bytes(t, d.hidden())}), vocab, scale);
      }, py::arg("qtype"), py::arg("rows"), py::arg("vocab"), py::arg("scale") = 0.0f)
      .def("set_head", [](PyDecoder& d, Array norm, float eps, py::object head) {
        auto h = lin(d, head, "lm_head", -1, d.hidden());
        if (!h) bad("the decoder needs an lm_head");
        d.set_head(d.take<float>(norm, "final norm", {d.hidden()}), eps, std::move(h));
      })
      .def("add_rope", [](PyDecoder& d, int style, Array cos, Array sin) {
        if (style < 0 || style > 2) bad("rope style must be 0 (half), 1 (interleave) or 2 (complex)");
        if (cos.ndim() != 2) bad("rope tables must be [positions, dims / 2]");
        RopeTable t;
        t.npos = cos.shape(0), t.half = cos.shape(1), t.style = static_cast<RopeStyle>(style);
        t.cos = d.take<float>(cos, "rope cos", {t.npos, t.half});
        t.sin = d.take<float>(sin, "rope sin", {t.npos, t.half});
        return d.add_rope(t);
      })
      .def("add_gqa_layer", &add_gqa)
      .def("add_mla_layer", &add_mla)
      .def("set_dense_mlp", &set_dense, py::arg("layer"), py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("act") = "silu")
      .def("set_post_norms", &set_post_norms, py::arg("layer"), py::arg("attn"), py::arg("ffn"))
      .def("set_window", &set_window, py::arg("layer"), py::arg("window"))
      .def("set_moe", &set_moe)
      .def("step", &step_py, py::arg("ids"), py::arg("positions"), py::arg("pages"), py::arg("rows"),
           py::arg("logits"))
      .def("record_routing", &PyDecoder::record_routing, py::arg("on"))
      .def("last_routing", [](PyDecoder& d) {
        // (logits [L, B, E] float32, ids [L, B, k] int64) of the last step's MoE layers, in order
        std::vector<int64_t> moe;
        for (int64_t i = 0; i < d.num_layers(); ++i)
          if (d.layer(i).mlp.moe) moe.push_back(i);
        const int64_t L = static_cast<int64_t>(moe.size()), B = d.last_tokens();
        const int64_t E = L ? d.layer(moe[0]).mlp.router.E : 0, k = L ? d.layer(moe[0]).mlp.router.k : 0;
        if (static_cast<int64_t>(d.routed_logits().size()) != L * B * E ||
            static_cast<int64_t>(d.routed_ids().size()) != L * B * k)
          bad("no routing recorded: record_routing(True) before the step");
        py::array_t<float> logits({L, B, E});
        py::array_t<int64_t> ids({L, B, k});
        std::copy(d.routed_logits().begin(), d.routed_logits().end(), logits.mutable_data());
        std::copy(d.routed_ids().begin(), d.routed_ids().end(), ids.mutable_data());
        return py::make_tuple(logits, ids);
      })
      .def_property_readonly("num_layers", &PyDecoder::num_layers)
      .def_property_readonly("max_positions", &PyDecoder::max_positions);
}

}  // namespace ktrans
