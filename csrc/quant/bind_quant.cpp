// Python bindings of the quant formats: format table, multi-threaded quantize / dequantize of
// whole tensors, and a row-by-row GEMV through vec_dot (test oracle and reference for the MoE
// kernels). ktrans/weights/quant.py wraps these with the user-facing checks; the checks here
// protect memory safety (sizes, dtypes) for direct callers.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/parallel.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

using U8Array = py::array_t<uint8_t, py::array::c_style>;
using F32Array = py::array_t<float, py::array::c_style>;

QType parse_qtype(const std::string& name) {
  QType t;
  if (!qtype_from_name(name.c_str(), &t)) throw std::invalid_argument("unknown quant type '" + name + "'");
  return t;
}

Isa parse_level(const std::string& isa) {
  Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
  if (static_cast<int>(level) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("ISA '") + isa_name(level) + "' is not supported by this CPU");
  return level;
}

template <class Fn>
Fn kernel_or_throw(const Kernel<Fn>& k, Isa level, QType t) {
  Fn fn = k.get(level);
  if (!fn) throw std::invalid_argument(std::string(k.name) + " is not implemented for " + qtype_traits(t).name);
  return fn;
}

int64_t whole_blocks(QType t, int64_t n_values) {
  const QTypeTraits& tr = qtype_traits(t);
  if (n_values % tr.block_size != 0)
    throw std::invalid_argument(std::string(tr.name) + ": " + std::to_string(n_values) +
                                " values is not a multiple of the block size " + std::to_string(tr.block_size));
  return n_values / tr.block_size;
}

// Quantizes x (float32, any shape whose last dim is a multiple of the block size) to a flat
// uint8 array; threads take contiguous runs of blocks.
U8Array quantize_py(const std::string& qtype, F32Array x, int nthreads, const std::string& isa) {
  const QType t = parse_qtype(qtype);
  QuantizeRowFn fn = kernel_or_throw(k_quantize_row[qi(t)], parse_level(isa), t);
  const QTypeTraits& tr = qtype_traits(t);
  const int64_t nb = whole_blocks(t, x.size());
  U8Array out(nb * tr.type_size);
  const float* src = x.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int nth = resolve_threads(nthreads, nb * tr.block_size / 65536 + 1);
    parallel_for(nth, [&](int ith, int n) {
      auto [b0, b1] = split_range(nb, ith, n);
      if (b1 > b0) fn(src + b0 * tr.block_size, dst + b0 * tr.type_size, (b1 - b0) * tr.block_size);
    });
  }
  return out;
}

F32Array dequantize_py(const std::string& qtype, U8Array raw, int64_t n_values, int nthreads, const std::string& isa) {
  const QType t = parse_qtype(qtype);
  DequantizeRowFn fn = kernel_or_throw(k_dequantize_row[qi(t)], parse_level(isa), t);
  const QTypeTraits& tr = qtype_traits(t);
  const int64_t nb = whole_blocks(t, n_values);
  if (raw.size() != nb * tr.type_size)
    throw std::invalid_argument(std::string(tr.name) + ": " + std::to_string(n_values) + " values need " +
                                std::to_string(nb * tr.type_size) + " bytes, got " + std::to_string(raw.size()));
  F32Array out(n_values);
  const uint8_t* src = raw.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int nth = resolve_threads(nthreads, n_values / 262144 + 1);
    parallel_for(nth, [&](int ith, int n) {
      auto [b0, b1] = split_range(nb, ith, n);
      if (b1 > b0) fn(src + b0 * tr.type_size, dst + b0 * tr.block_size, (b1 - b0) * tr.block_size);
    });
  }
  return out;
}

// y[m, r] = dot(W[r, :], x[m, :]) with W stored as qtype rows [rows, row_bytes] and x float32
// [M, n]: x is quantized to vec_dot_type(qtype) first (as the MoE kernels do).
F32Array vec_dot_py(const std::string& qtype, U8Array w, F32Array x, const std::string& isa, int nthreads) {
  const QType t = parse_qtype(qtype), at = vec_dot_type(t);
  const Isa level = parse_level(isa);
  VecDotFn dot = kernel_or_throw(k_vec_dot[qi(t)], level, t);
  QuantizeRowFn quant = kernel_or_throw(k_quantize_row[qi(at)], level, at);
  if (x.ndim() != 1 && x.ndim() != 2) throw std::invalid_argument("x must be [n] or [M, n]");
  if (w.ndim() != 2) throw std::invalid_argument("w must be uint8 [rows, row_bytes]");
  const int64_t n = x.shape(x.ndim() - 1), m = x.ndim() == 2 ? x.shape(0) : 1, rows = w.shape(0);
  whole_blocks(t, n);
  whole_blocks(at, n);
  if (w.shape(1) != qtype_row_bytes(t, n))
    throw std::invalid_argument("w rows must be " + std::to_string(qtype_row_bytes(t, n)) + " bytes for n=" +
                                std::to_string(n) + ", got " + std::to_string(w.shape(1)));
  const int64_t arb = qtype_row_bytes(at, n), wrb = w.shape(1);
  std::vector<uint8_t> act(m * arb);
  F32Array out(x.ndim() == 2 ? std::vector<int64_t>{m, rows} : std::vector<int64_t>{rows});
  const float* xs = x.data();
  const uint8_t* ws = w.data();
  float* ys = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < m; ++i) quant(xs + i * n, act.data() + i * arb, n);
    parallel_for(resolve_threads(nthreads, rows * n / 65536 + 1), [&](int ith, int nth) {
      auto [r0, r1] = split_range(rows, ith, nth);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = r0; r < r1; ++r) ys[i * rows + r] = dot(n, ws + r * wrb, act.data() + i * arb);
    });
  }
  return out;
}

py::list types_py() {
  py::list out;
  for (int i = 0; i < kNumQTypes; ++i) {
    const QTypeTraits& tr = qtype_traits(static_cast<QType>(i));
    py::dict d;
    d["name"] = tr.name;
    d["ggml_type"] = tr.ggml_type;
    d["block_size"] = tr.block_size;
    d["type_size"] = tr.type_size;
    d["vec_dot_type"] = qtype_traits(tr.vec_dot_type).name;
    d["has_quantize"] = k_quantize_row[i].get(Isa::generic) != nullptr;
    d["has_dequantize"] = k_dequantize_row[i].get(Isa::generic) != nullptr;
    d["has_vec_dot"] = k_vec_dot[i].get(Isa::generic) != nullptr;
    out.append(d);
  }
  return out;
}

// ISA level a quant kernel slot ("quantize" / "dequantize" / "vec_dot") really runs at `isa`.
std::string kernel_isa_py(const std::string& kind, const std::string& qtype, const std::string& isa) {
  const int i = qi(parse_qtype(qtype));
  const Isa level = parse_level(isa);
  if (kind == "quantize") return isa_name(k_quantize_row[i].resolved(level));
  if (kind == "dequantize") return isa_name(k_dequantize_row[i].resolved(level));
  if (kind == "vec_dot") return isa_name(k_vec_dot[i].resolved(level));
  throw std::invalid_argument("unknown quant kernel kind '" + kind + "' (expected quantize, dequantize, vec_dot)");
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def("quant_types", &types_py, "Formats implemented by the quant kernels, with their geometry");
  m.def("quant_quantize", &quantize_py, py::arg("qtype"), py::arg("x"), py::arg("nthreads") = 0,
        py::arg("isa") = "", "float32 values -> flat uint8 blocks (multi-threaded, GIL released)");
  m.def("quant_dequantize", &dequantize_py, py::arg("qtype"), py::arg("raw"), py::arg("n_values"),
        py::arg("nthreads") = 0, py::arg("isa") = "", "flat uint8 blocks -> float32 [n_values]");
  m.def("quant_vec_dot", &vec_dot_py, py::arg("qtype"), py::arg("w"), py::arg("x"), py::arg("isa") = "",
        py::arg("nthreads") = 0, "y = W @ x per row through vec_dot, x quantized to the activation format");
  m.def("quant_kernel_isa", &kernel_isa_py, py::arg("kind"), py::arg("qtype"), py::arg("isa") = "");
}

}  // namespace ktrans
