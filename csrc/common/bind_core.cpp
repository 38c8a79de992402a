// Python bindings for ISA selection and the conversion kernels.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "bindings.h"
#include "common/convert.h"
#include "common/isa.h"
#include "common/prefetch.h"

namespace ktrans {
namespace {

py::dict features_dict() {
  const CpuFeatures& f = cpu_features();
  py::dict d;
#define KT_FEATURE(x) d[#x] = f.x;
  KT_FEATURE(avx) KT_FEATURE(avx2) KT_FEATURE(fma) KT_FEATURE(f16c) KT_FEATURE(bmi2)
  KT_FEATURE(avx512f) KT_FEATURE(avx512bw) KT_FEATURE(avx512vl) KT_FEATURE(avx512dq)
  KT_FEATURE(avx512_vnni) KT_FEATURE(avx512_bf16) KT_FEATURE(avx512_fp16)
  KT_FEATURE(amx_tile) KT_FEATURE(amx_bf16) KT_FEATURE(amx_int8)
  KT_FEATURE(os_avx) KT_FEATURE(os_avx512) KT_FEATURE(os_amx) KT_FEATURE(amx_permitted)
#undef KT_FEATURE
  return d;
}

Isa isa_arg(const std::string& name) { return parse_isa(name); }

// Optional explicit ISA: "" means the selected one. Lets tests run every variant side by side.
Isa isa_or_selected(const std::string& name) { return name.empty() ? selected_isa() : parse_isa(name); }

void check_isa_supported(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("ISA '") + isa_name(isa) + "' is not supported by this CPU");
}

py::array_t<uint16_t> f32_to_bf16_py(py::array_t<float, py::array::c_style> x, const std::string& isa) {
  Isa level = isa_or_selected(isa);
  check_isa_supported(level);
  py::array_t<uint16_t> y(x.request().shape);
  const float* src = x.data();
  uint16_t* dst = y.mutable_data();
  int64_t n = x.size();
  {
    py::gil_scoped_release release;
    k_f32_to_bf16.get(level)(src, dst, n);
  }
  return y;
}

py::array_t<float> bf16_to_f32_py(py::array_t<uint16_t, py::array::c_style> x, const std::string& isa) {
  Isa level = isa_or_selected(isa);
  check_isa_supported(level);
  py::array_t<float> y(x.request().shape);
  const uint16_t* src = x.data();
  float* dst = y.mutable_data();
  int64_t n = x.size();
  {
    py::gil_scoped_release release;
    k_bf16_to_f32.get(level)(src, dst, n);
  }
  return y;
}

}  // namespace

void bind_core(py::module_& m) {
  py::register_exception<std::invalid_argument>(m, "KtransValueError", PyExc_ValueError);
  m.def("cpu_features", &features_dict, "CPU features seen by cpuid/XGETBV, and OS support bits");
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); }, "Highest ISA level this CPU supports");
  m.def("selected_isa", [] { return std::string(isa_name(selected_isa())); },
        "ISA level kernels use now (best, lowered by KTRANS_ISA or set_isa)");
  m.def("set_isa", [](const std::string& name) { set_isa(isa_arg(name)); }, py::arg("isa"),
        "Force an ISA level at or below the best supported one");
  m.def("prefetch_ahead", &check_prefetch_env,
        "Bytes the GGUF dot kernels prefetch ahead of each weight block (KTRANS_PREFETCH_AHEAD; 0: off)");
  m.def("isa_levels", [] {
    std::vector<std::string> v;
    for (int i = 0; i < kNumIsa; ++i) v.emplace_back(isa_name(static_cast<Isa>(i)));
    return v;
  });
  m.def("kernel_isa", [](const std::string& kernel, const std::string& isa) {
    Isa level = isa_or_selected(isa);
    if (kernel == k_f32_to_bf16.name) return std::string(isa_name(k_f32_to_bf16.resolved(level)));
    if (kernel == k_bf16_to_f32.name) return std::string(isa_name(k_bf16_to_f32.resolved(level)));
    throw std::invalid_argument("unknown kernel '" + kernel + "'");
  }, py::arg("kernel"), py::arg("isa") = "");
  m.def("f32_to_bf16", &f32_to_bf16_py, py::arg("x"), py::arg("isa") = "",
        "float32 array -> bf16 bits (uint16), round to nearest even");
  m.def("bf16_to_f32", &bf16_to_f32_py, py::arg("x"), py::arg("isa") = "",
        "bf16 bits (uint16) -> float32 array");
}

}  // namespace ktrans
