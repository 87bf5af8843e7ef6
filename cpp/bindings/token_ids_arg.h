// Converts a Python token-id argument (list of int or integer numpy array) to int32 token ids,
// raising ValueError that names the argument.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace rtpllm::bindings {

inline std::vector<int32_t> token_ids_arg(pybind11::handle value, const char* field) {
  namespace py = pybind11;
  std::vector<int64_t> wide;
  if (py::isinstance<py::array>(value)) {
    const auto array = py::reinterpret_borrow<py::array>(value);
    const char kind = array.dtype().kind();
    if (kind != 'i' && kind != 'u') {
      throw py::value_error(std::string(field) + ": expected integer token ids, got dtype " + std::string(py::str(array.dtype())));
    }
    if (array.ndim() != 1) throw py::value_error(std::string(field) + ": expected a 1-D array");
    if (array.dtype().is(py::dtype::of<int32_t>()) && (array.flags() & py::array::c_style)) {
      const auto* data = static_cast<const int32_t*>(array.data());
      return std::vector<int32_t>(data, data + array.size());
    }
    const auto converted = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(value);
    wide.assign(converted.data(), converted.data() + converted.size());
  } else {
    try {
      wide = value.cast<std::vector<int64_t>>();
    } catch (const py::cast_error&) {
      throw py::value_error(std::string(field) + ": expected a list of int or an integer numpy array");
    }
  }
  std::vector<int32_t> ids(wide.size());
  for (size_t i = 0; i < wide.size(); ++i) {
    if (wide[i] < INT32_MIN || wide[i] > INT32_MAX) {
      throw py::value_error(std::string(field) + ": token id " + std::to_string(wide[i]) + " at index " +
                            std::to_string(i) + " does not fit in int32");
    }
    ids[i] = static_cast<int32_t>(wide[i]);
  }
  return ids;
}

}  // namespace rtpllm::bindings
