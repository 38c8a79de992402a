// The extension module ktrans._C. Each subsystem adds one bind_* call here.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ktrans C++ core: CPU kernels with run-time ISA dispatch";
  ktrans::bind_core(m);
  ktrans::bind_packed(m);
  ktrans::bind_quant(m);
  ktrans::bind_moe(m);
  ktrans::bind_linear(m);
  ktrans::bind_decode(m);
}
