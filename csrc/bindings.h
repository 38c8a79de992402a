// One PYBIND11_MODULE (bindings.cpp) calls one bind_* function per subsystem.
#pragma once
#include <pybind11/pybind11.h>

namespace ktrans {
namespace py = pybind11;

void bind_core(py::module_& m);  // csrc/common/bind_core.cpp: ISA selection, conversions
void bind_quant(py::module_& m);  // csrc/quant/bind_quant.cpp: GGUF quant formats
void bind_moe(py::module_& m);  // csrc/moe/bind_moe.cpp: thread pool, CPU MoE layer, stream-ordered tasks
void bind_packed(py::module_& m);  // csrc/packed/bind_packed.cpp: packed AMX/AVX-512 formats and kernels
void bind_linear(py::module_& m);  // csrc/linear/bind_linear.cpp: dense linear layers on GGUF rows
void bind_decode(py::module_& m);  // csrc/decode/bind_decode.cpp: the fused all-CPU decode step
}  // namespace ktrans
