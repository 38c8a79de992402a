// Python bindings of the packed formats (tests, benchmarks): pack from f32 / bf16 / GGUF / fp8,
// unpack, packed_gemm on any supported ISA level, and the AMX tile-only peak loop.
// Arrays are checked here (dtype, shape, contiguity); the kernels take raw pointers.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "amx/amx_peak.h"
#include "bindings.h"
#include "packed/packed.h"
#include "quant/quant.h"

namespace ktrans {
namespace {

using U8 = py::array_t<uint8_t, py::array::c_style>;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// Runs fn(n_begin, n_end) on nthreads threads over [0, N), split at panel boundaries.
template <class Fn>
void split_rows(int64_t N, int nthreads, Fn&& fn) {
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, panels)));
  std::vector<std::thread> threads;
  std::exception_ptr err;
  std::mutex mu;
  for (int t = 0; t < nthreads; ++t) {
    const int64_t b = std::min(N, panels * t / nthreads * kPanelCols);
    const int64_t e = std::min(N, panels * (t + 1) / nthreads * kPanelCols);
    threads.emplace_back([&, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        err = std::current_exception();
      }
    });
  }
  for (auto& th : threads) th.join();
  if (err) std::rethrow_exception(err);
}

// A new uint8 array whose data is 64-byte aligned: every panel line is then one cache line (numpy
// itself only guarantees 16 bytes, and split lines cost the kernels a large share of bandwidth).
U8 aligned_u8(size_t n) {
  void* p = std::aligned_alloc(64, (n + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  py::capsule owner(p, [](void* q) { std::free(q); });
  return U8({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(1)}, static_cast<uint8_t*>(p), owner);
}

// Shared front of every pack_* binding: format, output buffer, row range.
template <class PackFn>
U8 pack_common(const std::string& fmt, int64_t N, int64_t K, int64_t n_begin, int64_t n_end, py::object out,
               int nthreads, PackFn&& pack) {
  const PackedFormat f = parse_packed_format(fmt);
  const size_t bytes = packed_bytes(f, N, K);
  U8 dst = out.is_none() ? aligned_u8(bytes) : out.cast<U8>();
  require(static_cast<size_t>(dst.size()) == bytes && dst.writeable(),
          "pack: out must be a writable uint8 array of packed_bytes = " + std::to_string(bytes));
  if (n_end < 0) n_end = N;
  uint8_t* d = dst.mutable_data();
  {
    py::gil_scoped_release release;
    if (n_begin == 0 && n_end == N)
      split_rows(N, nthreads, [&](int64_t b, int64_t e) { pack(f, b, e, d); });
    else
      pack(f, n_begin, n_end, d);
  }
  return dst;
}

U8 pack_f32_py(const std::string& fmt, py::array_t<float, py::array::c_style> W, int64_t n_begin, int64_t n_end,
               py::object out, int nthreads) {
  require(W.ndim() == 2, "pack_f32: W must be a 2-D float32 array [N, K]");
  const int64_t N = W.shape(0), K = W.shape(1);
  const float* w = W.data();
  return pack_common(fmt, N, K, n_begin, n_end, out, nthreads, [&](PackedFormat f, int64_t b, int64_t e, uint8_t* d) {
    pack_rows_f32(f, w, N, K, b, e, d);
  });
}

U8 pack_bf16_py(const std::string& fmt, py::array_t<uint16_t, py::array::c_style> W, int64_t n_begin,
                int64_t n_end, py::object out, int nthreads) {
  require(W.ndim() == 2, "pack_bf16: W must be a 2-D uint16 (bf16 bits) array [N, K]");
  const int64_t N = W.shape(0), K = W.shape(1);
  const uint16_t* w = W.data();
  return pack_common(fmt, N, K, n_begin, n_end, out, nthreads, [&](PackedFormat f, int64_t b, int64_t e, uint8_t* d) {
    pack_rows_bf16(f, w, N, K, b, e, d);
  });
}

U8 pack_gguf_py(const std::string& fmt, const std::string& qtype, U8 raw, int64_t K, int64_t n_begin,
                int64_t n_end, py::object out, int nthreads) {
  QType t;
  require(qtype_from_name(qtype.c_str(), &t), "pack_gguf: unknown quant type '" + qtype + "'");
  require(raw.ndim() == 2 && raw.shape(1) == qtype_row_bytes(t, K),
          "pack_gguf: raw must be uint8 [N, row_bytes(" + qtype + ", K)]");
  const int64_t N = raw.shape(0);
  const uint8_t* w = raw.data();
  return pack_common(fmt, N, K, n_begin, n_end, out, nthreads, [&](PackedFormat f, int64_t b, int64_t e, uint8_t* d) {
    pack_rows_gguf(f, qi(t), w, N, K, b, e, d);
  });
}

U8 pack_fp8_py(const std::string& fmt, U8 W, py::array_t<float, py::array::c_style> scale_inv, int64_t n_begin,
               int64_t n_end, py::object out, int nthreads) {
  require(W.ndim() == 2, "pack_fp8: W must be a 2-D uint8 (e4m3 bytes) array [N, K]");
  const int64_t N = W.shape(0), K = W.shape(1);
  require(scale_inv.ndim() == 2 && scale_inv.shape(0) == (N + 127) / 128 && scale_inv.shape(1) == (K + 127) / 128,
          "pack_fp8: scale_inv must be float32 [ceil(N/128), ceil(K/128)]");
  const uint8_t* w = W.data();
  const float* s = scale_inv.data();
  return pack_common(fmt, N, K, n_begin, n_end, out, nthreads, [&](PackedFormat f, int64_t b, int64_t e, uint8_t* d) {
    pack_rows_fp8(f, w, s, N, K, b, e, d);
  });
}

py::array_t<float> unpack_py(const std::string& fmt, U8 packed, int64_t N, int64_t K) {
  const PackedFormat f = parse_packed_format(fmt);
  require(static_cast<size_t>(packed.size()) == packed_bytes(f, N, K), "unpack: packed has the wrong size for N, K");
  py::array_t<float> W({N, K});
  unpack_rows_f32(f, packed.data(), N, K, 0, N, W.mutable_data());
  return W;
}

void gemm_py(const std::string& fmt, U8 packed, int64_t N, int64_t K, py::array_t<uint16_t> x, py::array_t<float> y,
             int64_t n_begin, int64_t n_end, bool accumulate, const std::string& isa) {
  const PackedFormat f = parse_packed_format(fmt);
  require(static_cast<size_t>(packed.size()) == packed_bytes(f, N, K), "gemm: packed has the wrong size for N, K");
  require(x.ndim() == 2 && x.strides(1) == 2 && x.strides(0) % 2 == 0,
          "gemm: x must be a 2-D uint16 (bf16 bits) array [M, K] with contiguous rows");
  require(y.ndim() == 2 && y.strides(1) == 4 && y.strides(0) % 4 == 0 && y.writeable(),
          "gemm: y must be a writable 2-D float32 array [M, N] with contiguous rows");
  const int64_t M = x.shape(0);
  require(x.shape(1) == K, "gemm: x has " + std::to_string(x.shape(1)) + " columns, expected K=" + std::to_string(K));
  require(y.shape(0) == M && y.shape(1) >= N, "gemm: y must be [M, >= N]");
  if (n_end < 0) n_end = N;
  const Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
  require(static_cast<int>(level) <= static_cast<int>(best_isa()), "gemm: ISA '" + isa + "' is not supported here");
  const int64_t ldx = M > 1 ? x.strides(0) / 2 : K, ldy = M > 1 ? y.strides(0) / 4 : y.shape(1);
  const uint16_t* xp = x.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  packed_gemm_isa(level, f, packed.data(), N, K, xp, ldx, M, yp, ldy, n_begin, n_end, accumulate);
}

// Prepares x once, then runs every (n_begin, n_end) of `ranges` on each packed matrix in turn.
void gemm_prepared_py(const std::string& fmt, std::vector<U8> mats, int64_t N, int64_t K, py::array_t<uint16_t> x,
                      std::vector<py::array_t<float>> ys, std::vector<std::pair<int64_t, int64_t>> ranges,
                      const std::string& isa) {
  const PackedFormat f = parse_packed_format(fmt);
  require(mats.size() == ys.size(), "gemm_prepared: one y per packed matrix");
  require(x.ndim() == 2 && x.strides(1) == 2 && x.shape(1) == K, "gemm_prepared: x must be uint16 [M, K]");
  const int64_t M = x.shape(0), ldx = M > 1 ? x.strides(0) / 2 : K;
  const Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
  U8 buf = aligned_u8(std::max<size_t>(1, packed_acts_bytes(level, f, M, K)));
  const PackedActs acts = packed_prepare_acts(level, f, x.data(), ldx, M, K, buf.mutable_data());
  for (size_t i = 0; i < mats.size(); ++i) {
    require(static_cast<size_t>(mats[i].size()) == packed_bytes(f, N, K), "gemm_prepared: packed has the wrong size");
    require(ys[i].ndim() == 2 && ys[i].shape(0) == M && ys[i].shape(1) == N && ys[i].strides(1) == 4,
            "gemm_prepared: y must be float32 [M, N] with contiguous rows");
    for (const auto& [b, e] : ranges)
      packed_gemm_prepared(acts, mats[i].data(), N, ys[i].mutable_data(), M > 1 ? ys[i].strides(0) / 4 : N, b, e,
                           false);
  }
}

}  // namespace

void bind_packed(py::module_& m) {
  m.def("packed_acts_bytes", [](const std::string& fmt, int64_t M, int64_t K, const std::string& isa) {
    return packed_acts_bytes(isa.empty() ? selected_isa() : parse_isa(isa), parse_packed_format(fmt), M, K);
  }, py::arg("format"), py::arg("M"), py::arg("K"), py::arg("isa") = "");
  m.def("packed_gemm_prepared", &gemm_prepared_py, py::arg("format"), py::arg("packed"), py::arg("N"), py::arg("K"),
        py::arg("x"), py::arg("y"), py::arg("ranges"), py::arg("isa") = "",
        "x prepared once, then y_i[:, b:e] = x @ W_i.T for every packed matrix i and every (b, e)");
  m.def("packed_bytes", [](const std::string& fmt, int64_t N, int64_t K) {
    return packed_bytes(parse_packed_format(fmt), N, K);
  }, py::arg("format"), py::arg("N"), py::arg("K"));
  m.def("pack_f32", &pack_f32_py, py::arg("format"), py::arg("W"), py::arg("n_begin") = 0, py::arg("n_end") = -1,
        py::arg("out") = py::none(), py::arg("nthreads") = 1, "Pack f32 W [N, K] (rows [n_begin, n_end)) into out");
  m.def("pack_bf16", &pack_bf16_py, py::arg("format"), py::arg("W"), py::arg("n_begin") = 0, py::arg("n_end") = -1,
        py::arg("out") = py::none(), py::arg("nthreads") = 1, "Pack bf16 W [N, K] (uint16 bits) into out");
  m.def("pack_gguf", &pack_gguf_py, py::arg("format"), py::arg("qtype"), py::arg("raw"), py::arg("K"),
        py::arg("n_begin") = 0, py::arg("n_end") = -1, py::arg("out") = py::none(), py::arg("nthreads") = 1,
        "Pack GGUF rows raw [N, row_bytes] of quant type qtype (K values per row)");
  m.def("pack_fp8", &pack_fp8_py, py::arg("format"), py::arg("W"), py::arg("scale_inv"), py::arg("n_begin") = 0,
        py::arg("n_end") = -1, py::arg("out") = py::none(), py::arg("nthreads") = 1,
        "Pack fp8 e4m3 W [N, K] (uint8) with f32 128x128 block scales scale_inv");
  m.def("unpack", &unpack_py, py::arg("format"), py::arg("packed"), py::arg("N"), py::arg("K"),
        "The f32 weights [N, K] a packed matrix stands for");
  m.def("packed_gemm", &gemm_py, py::arg("format"), py::arg("packed"), py::arg("N"), py::arg("K"), py::arg("x"),
        py::arg("y"), py::arg("n_begin") = 0, py::arg("n_end") = -1, py::arg("accumulate") = false,
        py::arg("isa") = "", "y[:, n_begin:n_end] (+)= x @ W.T with x bf16 bits [M, K], y f32 [M, N]");
  m.def("packed_kernel_isa", [](const std::string& fmt, const std::string& isa) {
    const Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
    return std::string(isa_name(packed_gemm_kernel(parse_packed_format(fmt)).resolved(level)));
  }, py::arg("format"), py::arg("isa") = "");
  m.def("amx_peak", [](const std::string& dtype, int64_t iters, int nthreads, int accumulators) {
    require(best_isa() == Isa::amx, "amx_peak: this CPU has no usable AMX");
    require(dtype == "bf16" || dtype == "int8", "amx_peak: dtype must be 'bf16' or 'int8'");
    require(accumulators == 4 || accumulators == 6, "amx_peak: accumulators must be 4 or 6");
    py::gil_scoped_release release;
    return amx_peak_seconds(dtype == "int8", iters, nthreads, accumulators);
  }, py::arg("dtype"), py::arg("iters"), py::arg("nthreads") = 1, py::arg("accumulators") = 4,
     "Seconds for `iters` tile dot products per thread (16x16 C tiles, no memory traffic)");
  m.def("core_clock_ghz", [](int nthreads) {
    py::gil_scoped_release release;
    return core_clock_ghz(nthreads);
  }, py::arg("nthreads") = 1, "Core clock (GHz) under nthreads busy threads, from dependent integer adds");
}

}  // namespace ktrans
