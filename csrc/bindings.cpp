// pybind11 entry point of flashdino._C. Builds with or without CUDA (FLASHDINO_WITH_CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#ifdef FLASHDINO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

#ifndef FLASHDINO_VERSION
#define FLASHDINO_VERSION "0.0.0"
#endif

namespace flashdino {
#ifdef FLASHDINO_WITH_CUDA
void register_rope_attention_qkv(py::module_& m);
#endif

namespace {

std::vector<std::string> cuda_architectures() {
  std::vector<std::string> out;
#ifdef FLASHDINO_WITH_CUDA
  std::stringstream ss(FLASHDINO_CUDA_ARCHS);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
#endif
  return out;
}

py::object cuda_version() {
#ifdef FLASHDINO_WITH_CUDA
  return py::str(FLASHDINO_CUDA_VERSION);
#else
  return py::none();
#endif
}

// CUDA driver version as seen by the statically linked runtime (0 when there is no driver).
int cuda_driver_version() {
#ifdef FLASHDINO_WITH_CUDA
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
#else
  return 0;
#endif
}

}  // namespace
}  // namespace flashdino

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashdino native kernels (no libtorch; tensors cross as data pointers, strides and streams)";
  m.def("version", [] { return std::string(FLASHDINO_VERSION); }, "flashdino version the module was built from");
  m.def("has_cuda", [] {
#ifdef FLASHDINO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA kernels were compiled in");
  m.def("cuda_architectures", &flashdino::cuda_architectures,
        "CUDA architectures compiled in, e.g. ['80', '86', '89', '90a', '100', '120'] (empty without CUDA)");
  m.def("cuda_version", &flashdino::cuda_version, "CUDA toolkit version used at build time, or None");
  m.def("cuda_driver_version", &flashdino::cuda_driver_version, "CUDA driver version (0 if none)");
#ifdef FLASHDINO_WITH_CUDA
  flashdino::register_rope_attention_qkv(m);
#endif
}
