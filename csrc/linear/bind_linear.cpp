// Python bindings of the CPU linear layer (QLinear): built over a weight array the binding keeps
// alive (a zero-copy view of the GGUF mapping), forward on the owned pool with the GIL released.
// Arrays are checked here (dtype, shape, C-contiguity); nothing is copied or converted.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "linear/linear.h"

namespace ktrans {
namespace {

using Array = py::array;

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

bool is_c(const Array& a) { return (a.flags() & py::array::c_style) != 0; }

// Owns the arrays a QLinear reads; released with the GIL held (the last reference to a QLinear
// is always dropped from Python: by the operator, or by a decoder plan built over it).
struct Keep {
  py::object w, b;
  ~Keep() {
    py::gil_scoped_acquire gil;
    w = py::object();
    b = py::object();
  }
};

std::shared_ptr<QLinear> make_linear(std::shared_ptr<ThreadPool> pool, const std::string& qtype, int64_t N, int64_t K,
                                     Array w, py::object bias, const std::string& isa, int64_t gemm_min_tokens) {
  QType t;
  if (!qtype_from_name(qtype.c_str(), &t) || t == QType::q8_k) bad("unknown weight format '" + qtype + "'");
  Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
  if (static_cast<int>(level) > static_cast<int>(best_isa()))
    bad(std::string("ISA '") + isa_name(level) + "' is not supported by this CPU");
  if (!w.dtype().is(py::dtype::of<uint8_t>()) || !is_c(w)) bad("linear weights must be a C-contiguous uint8 array");
  const QTypeTraits& tr = qtype_traits(t);
  if (K <= 0 || K % tr.block_size != 0)
    bad(std::string(tr.name) + " linear: K=" + std::to_string(K) + " is not a positive multiple of the block size " +
        std::to_string(tr.block_size));
  if (N <= 0 || w.nbytes() != N * qtype_row_bytes(t, K))
    bad(std::string(tr.name) + " linear [" + std::to_string(N) + ", " + std::to_string(K) + "] needs " +
        std::to_string(N * qtype_row_bytes(t, K)) + " weight bytes, got " + std::to_string(w.nbytes()));
  const float* b = nullptr;
  if (!bias.is_none()) {
    Array ba = bias.cast<Array>();
    if (!ba.dtype().is(py::dtype::of<float>()) || !is_c(ba) || ba.size() != N)
      bad("linear bias must be a C-contiguous float32 array of " + std::to_string(N) + " values");
    b = static_cast<const float*>(ba.data());
  }
  auto keep = std::make_shared<Keep>();
  keep->w = w;
  keep->b = bias;
  auto* lin = new QLinear(std::move(pool), t, N, K, static_cast<const uint8_t*>(w.data()), b, level);
  if (gemm_min_tokens >= 0) lin->set_gemm_min_tokens(gemm_min_tokens);
  return std::shared_ptr<QLinear>(lin, [keep](QLinear* p) { delete p; });
}

void forward_py(const QLinear& lin, Array x, Array out) {
  if (!x.dtype().is(py::dtype::of<float>()) || !is_c(x) || x.ndim() != 2 || x.shape(1) != lin.K())
    bad("linear input must be a C-contiguous float32 [T, " + std::to_string(lin.K()) + "] array");
  const int64_t T = x.shape(0);
  if (!out.dtype().is(py::dtype::of<float>()) || !is_c(out) || out.ndim() != 2 || out.shape(0) != T ||
      out.shape(1) != lin.N() || !out.writeable())
    bad("linear output must be a writeable C-contiguous float32 [" + std::to_string(T) + ", " +
        std::to_string(lin.N()) + "] array");
  const float* xp = static_cast<const float*>(x.data());
  float* yp = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  if (T * lin.N() * lin.K() <= QLinear::kSerialWork) {
    thread_local std::vector<uint8_t> xq;
    xq.resize(T * lin.act_row_bytes());
    return lin.forward_serial(xp, lin.K(), T, yp, lin.N(), xq.data());
  }
  lin.pool()->run([&] { lin.forward(xp, lin.K(), T, yp, lin.N()); });
}

}  // namespace

void bind_linear(py::module_& m) {
  py::class_<QLinear, std::shared_ptr<QLinear>>(m, "Linear",
                                                "y = x @ W.T (+ bias) on GGUF rows as stored (csrc/linear/linear.h)")
      .def(py::init(&make_linear), py::arg("pool"), py::arg("qtype"), py::arg("N"), py::arg("K"), py::arg("weight"),
           py::arg("bias") = py::none(), py::arg("isa") = "", py::arg("gemm_min_tokens") = -1)
      .def("forward", &forward_py, py::arg("x"), py::arg("out"))
      .def("uses_gemm", &QLinear::uses_gemm, py::arg("T"))
      .def_property_readonly("gemm_min_tokens", &QLinear::gemm_min_tokens)
      .def_property_readonly("act_type", [](const QLinear& l) { return std::string(qtype_traits(l.act_type()).name); })
      .def_property_readonly("N", &QLinear::N)
      .def_property_readonly("K", &QLinear::K);
}

}  // namespace ktrans
