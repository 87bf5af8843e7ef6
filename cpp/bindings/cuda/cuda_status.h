// Turns a kernel launcher's cudaError_t into a Python exception that names the kernel and the
// arguments it was given: ValueError for arguments the kernel does not support, RuntimeError
// for anything the device reported.
#pragma once

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace rtpllm::bindings {

inline void throw_if_error(cudaError_t err, const char* kernel, const std::string& args) {
  if (err == cudaSuccess) return;
  const std::string message = std::string(kernel) + ": " + cudaGetErrorString(err) + " (" + args + ")";
  if (err == cudaErrorInvalidValue || err == cudaErrorMisalignedAddress) throw pybind11::value_error(message);
  throw std::runtime_error(message);
}

}  // namespace rtpllm::bindings
