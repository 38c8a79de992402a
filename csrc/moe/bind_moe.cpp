// Python bindings of the CPU engine: ThreadPool, MoeLayer (load / forward / async submit) and the
// stream-ordered StreamTask. Tensors cross as numpy views (bf16 as uint16 bits), checked here;
// every long call releases the GIL.
#include <sys/syscall.h>
#include <unistd.h>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/cuda_host.h"
#include "common/threadpool.h"
#include "moe/moe.h"

namespace ktrans {
namespace {

using Array = py::array;

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

void check_2d(const Array& a, const char* name, int64_t rows, int64_t cols) {
  if (a.ndim() != 2 || !(a.flags() & py::array::c_style))
    bad(std::string(name) + " must be a C-contiguous 2-D array");
  if ((rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols))
    bad(std::string(name) + " has shape [" + std::to_string(a.shape(0)) + ", " + std::to_string(a.shape(1)) +
        "], expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

// Validates one forward call's arrays and turns them into raw pointers.
MoeArgs make_args(const MoeLayer& layer, const Array& x, const Array& ids, const Array& w, Array& out,
                  bool accumulate) {
  const int64_t H = layer.shape().H;
  MoeArgs a;
  const bool bf16 = x.dtype().is(py::dtype::of<uint16_t>());
  if (!bf16 && !x.dtype().is(py::dtype::of<float>())) bad("x must be bf16 (uint16 bits) or float32");
  check_2d(x, "x", -1, H);
  a.T = x.shape(0);
  check_2d(ids, "expert ids", a.T, -1);
  a.k = ids.shape(1);
  a.ids_i64 = ids.dtype().is(py::dtype::of<int64_t>());
  if (!a.ids_i64 && !ids.dtype().is(py::dtype::of<int32_t>())) bad("expert ids must be int32 or int64");
  if (!w.dtype().is(py::dtype::of<float>())) bad("routing weights must be float32");
  check_2d(w, "routing weights", a.T, a.k);
  if (!out.dtype().is(x.dtype())) bad("out must have the dtype of x");
  check_2d(out, "out", a.T, H);
  if (!out.writeable()) bad("out must be writeable");
  a.x = x.data();
  a.x_bf16 = bf16;
  a.ids = ids.data();
  a.weights = static_cast<const float*>(w.data());
  a.out = out.mutable_data();
  a.accumulate = accumulate;
  return a;
}

QType qtype_arg(const std::string& name) {
  QType t;
  if (!qtype_from_name(name.c_str(), &t) || t == QType::q8_k) bad("unknown weight format '" + name + "'");
  return t;
}

MoeBackend backend_arg(const std::string& s) {
  if (s == "gguf") return MoeBackend::gguf;
  if (s == "amx_bf16") return MoeBackend::amx_bf16;
  if (s == "amx_int8") return MoeBackend::amx_int8;
  if (s == "amx_int4") return MoeBackend::amx_int4;
  bad("unknown MoE backend '" + s + "' (expected gguf, amx_bf16, amx_int8 or amx_int4)");
}

NumaMode numa_arg(const std::string& s) {
  if (s == "replicate") return NumaMode::replicate;
  if (s == "split") return NumaMode::split;
  bad("unknown NUMA mode '" + s + "' (expected replicate or split)");
}

MoeShape shape_arg(int64_t E, int64_t H, int64_t I, const std::vector<std::string>& types) {
  if (types.size() != 3) bad("weight formats must be [gate, up, down]");
  MoeShape s;
  s.E = E, s.H = H, s.I = I;
  for (int p = 0; p < 3; ++p) s.types[p] = qtype_arg(types[p]);
  return s;
}

MoeGating gating_arg(const std::string& act, float alpha, float limit) {
  MoeGating g;
  if (act == "silu") return g;
  if (act != "swiglu_oai") bad("unknown MoE activation '" + act + "' (expected silu or swiglu_oai)");
  if (!(limit > 0.0f) || !std::isfinite(alpha)) bad("swiglu_oai needs a positive limit and a finite alpha");
  g.act = MoeAct::swiglu_oai;
  g.alpha = alpha;
  g.limit = limit;
  return g;
}

std::shared_ptr<MoeLayer> make_layer(std::shared_ptr<ThreadPool> pool, int64_t E, int64_t H, int64_t I,
                                     const std::vector<std::string>& types, const std::string& backend,
                                     const std::string& numa, const std::string& isa, int64_t max_chunk,
                                     int64_t gemm_min_tokens, const std::string& act, float alpha, float limit) {
  Isa level = isa.empty() ? selected_isa() : parse_isa(isa);
  if (static_cast<int>(level) > static_cast<int>(best_isa()))
    bad(std::string("ISA '") + isa_name(level) + "' is not supported by this CPU");
  MoeShape shape = shape_arg(E, H, I, types);
  shape.gating = gating_arg(act, alpha, limit);
  auto layer = std::make_shared<MoeLayer>(pool, shape, backend_arg(backend), numa_arg(numa), level, max_chunk);
  if (gemm_min_tokens >= 0) layer->set_gemm_min_tokens(gemm_min_tokens);
  return layer;
}

void load_py(MoeLayer& layer, int proj, int64_t e_begin, py::array_t<uint8_t, py::array::c_style> src) {
  if (proj < 0 || proj > 2) bad("projection must be 0 (gate), 1 (up) or 2 (down)");
  const MoeShape& s = layer.shape();
  const int64_t rows = proj < 2 ? s.I : s.H, k = proj < 2 ? s.H : s.I;
  const int64_t per_expert = rows * qtype_row_bytes(s.types[proj], k);
  if (src.ndim() < 1 || src.nbytes() % per_expert != 0 || src.nbytes() == 0)
    bad("expert weights of projection " + std::to_string(proj) + " must be a whole number of experts of " +
        std::to_string(per_expert) + " bytes, got " + std::to_string(src.nbytes()));
  const int64_t n = src.nbytes() / per_expert;
  if (e_begin < 0 || e_begin + n > s.E) bad("experts [" + std::to_string(e_begin) + ", " +
                                            std::to_string(e_begin + n) + ") out of range");
  const uint8_t* p = src.data();
  py::gil_scoped_release release;
  layer.pool()->run([&] { layer.load(proj, e_begin, e_begin + n, p); });
}

void load_bias_py(MoeLayer& layer, int proj, py::array_t<float, py::array::c_style> src) {
  if (proj < 0 || proj > 2) bad("projection must be 0 (gate), 1 (up) or 2 (down)");
  const MoeShape& s = layer.shape();
  const int64_t rows = proj < 2 ? s.I : s.H;
  if (src.ndim() != 2 || src.shape(0) != s.E || src.shape(1) != rows)
    bad("biases of projection " + std::to_string(proj) + " must be float32 [" + std::to_string(s.E) + ", " +
        std::to_string(rows) + "]");
  layer.load_bias(proj, src.data());
}

}  // namespace

void bind_moe(py::module_& m) {
  m.def("physical_cores", [] {
    std::vector<std::pair<int, int>> v;
    for (const CoreInfo& c : physical_cores()) v.emplace_back(c.cpu, c.node);
    return v;
  }, "(cpu, numa node) of one hyper-thread per physical core available to this process");
  m.def("cuda_host_available", &cuda_host_available);
  m.def("cuda_host_unavailable_reason", &cuda_host_unavailable_reason);
  m.def("cuda_memops_available", &cuda_memops_available);
  m.def("cuda_memops_unavailable_reason", &cuda_memops_unavailable_reason);

  py::class_<ThreadPool, std::shared_ptr<ThreadPool>>(m, "ThreadPool")
      .def(py::init<int, int, bool, int>(), py::arg("nthreads"), py::arg("ngroups") = 0, py::arg("pin") = true,
           py::arg("spin_us") = 200)
      .def_property_readonly("size", &ThreadPool::size)
      .def_property_readonly("num_groups", &ThreadPool::num_groups)
      .def("group_of", &ThreadPool::group_of)
      .def_property_readonly("scratch_bytes", [](const ThreadPool& p) { return moe_scratch_bytes(&p); },
                             "bytes of the MoE scratch shared by every MoeLayer on this pool")
      .def("sync", [](ThreadPool& p, uint64_t ticket) { p.sync(ticket); }, py::arg("ticket"),
           py::call_guard<py::gil_scoped_release>())
      .def("sync_all", &ThreadPool::sync_all, py::call_guard<py::gil_scoped_release>())
      .def("round_trip", [](ThreadPool& p) { p.run([&p] { p.parallel([](int, int) {}); }); },
           py::call_guard<py::gil_scoped_release>(),
           "submit a task that fans out to every thread with no work, and wait for it: the fixed "
           "cost of one call (bench/moe_call.py)")
      .def("run_thread_id", [](ThreadPool& p) {
             long tid = 0;
             p.run([&tid] { tid = static_cast<long>(syscall(SYS_gettid)); });
             return tid;
           }, py::call_guard<py::gil_scoped_release>(),
           "run() a task that records the OS thread id it ran on (the caller's when run inline)");

  py::class_<StreamTask, std::shared_ptr<StreamTask>>(m, "StreamTask")
      .def("launch_start", &StreamTask::launch_start, py::arg("stream"))
      .def("launch_wait", &StreamTask::launch_wait, py::arg("stream"))
      .def("take_error", &StreamTask::take_error)
      // memop hand-off: flags is a uint32 array of 2 (pinned, device-mapped host memory) that
      // the caller keeps alive as long as the task
      .def("set_flags", [](StreamTask& t, py::array_t<uint32_t, 0> flags) {
        if (flags.ndim() != 1 || flags.shape(0) < 2 || !(flags.flags() & py::array::c_style) || !flags.writeable())
          throw py::value_error("StreamTask.set_flags: expected a writable contiguous uint32 array of 2");
        t.set_flags(flags.mutable_data());
      }, py::arg("flags"))
      .def("arm", &StreamTask::arm)
      .def("launch_start_memop", &StreamTask::launch_start_memop, py::arg("stream"))
      .def("launch_wait_memop", &StreamTask::launch_wait_memop, py::arg("stream"));

  py::class_<MoeLayer, std::shared_ptr<MoeLayer>>(m, "MoeLayer")
      .def(py::init(&make_layer), py::arg("pool"), py::arg("E"), py::arg("H"), py::arg("I"), py::arg("types"),
           py::arg("backend") = "gguf", py::arg("numa") = "replicate", py::arg("isa") = "",
           py::arg("max_chunk") = 4096, py::arg("gemm_min_tokens") = -1, py::arg("act") = "silu",
           py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f)
      .def("load", &load_py, py::arg("proj"), py::arg("e_begin"), py::arg("src"))
      .def("load_bias", &load_bias_py, py::arg("proj"), py::arg("src"),
           "float32 biases [E, I] (gate 0, up 1) or [E, H] (down 2) of every expert")
      .def_property_readonly("weight_bytes", &MoeLayer::weight_bytes)
      .def_property_readonly("buffer_bytes", &MoeLayer::buffer_bytes)
      .def_property_readonly("gemm_min_tokens", &MoeLayer::gemm_min_tokens)
      .def_property("fused_max_tokens", &MoeLayer::fused_max_tokens, &MoeLayer::set_fused_max_tokens,
                    "chunks of at most this many tokens run in one fan-out of the pool (0: never)")
      .def("forward", [](MoeLayer& l, Array x, Array ids, Array w, Array out, bool acc) {
        MoeArgs a = make_args(l, x, ids, w, out, acc);
        py::gil_scoped_release release;
        l.pool()->run([&l, a] { l.forward(a); });
      }, py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("out"), py::arg("accumulate") = false)
      // Queues the forward and returns its ticket for pool.sync(); the caller keeps the arrays alive.
      .def("submit", [](std::shared_ptr<MoeLayer> l, Array x, Array ids, Array w, Array out, bool acc) {
        MoeArgs a = make_args(*l, x, ids, w, out, acc);
        return l->pool()->submit([l, a] { l->forward(a); });
      }, py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("out"), py::arg("accumulate") = false)
      // A reusable stream-ordered forward on fixed (pinned) buffers; the caller keeps them alive.
      .def("stream_task", [](std::shared_ptr<MoeLayer> l, Array x, Array ids, Array w, Array out, bool acc) {
        MoeArgs a = make_args(*l, x, ids, w, out, acc);
        return std::make_shared<StreamTask>(l->pool().get(), [l, a] { l->forward(a); });
      }, py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("out"), py::arg("accumulate") = false);

  m.def("moe_weight_bytes", [](int64_t E, int64_t H, int64_t I, const std::vector<std::string>& types,
                               const std::string& backend, const std::string& numa, int ngroups) {
    return moe_weight_bytes(shape_arg(E, H, I, types), backend_arg(backend), numa_arg(numa), ngroups);
  }, py::arg("E"), py::arg("H"), py::arg("I"), py::arg("types"), py::arg("backend") = "gguf",
        py::arg("numa") = "replicate", py::arg("ngroups") = 1);
}

}  // namespace ktrans
