// The header of a safetensors file: an 8-byte little-endian length, a JSON object mapping each
// tensor name to {dtype, shape, data_offsets}, then the tensors' bytes.
//
// Parsing validates everything the reads rely on, so a bad file fails here, naming the file and
// the tensor, before a single weight is read: every tensor lies inside the file, its byte size is
// shape x dtype size, and no two tensors overlap.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace rtpllm::loader {

struct TensorInfo {
  std::string name;
  std::string dtype;           // as written: "BF16", "F16", "F32", ...
  std::vector<uint64_t> shape;
  uint64_t offset = 0;         // absolute byte offset of the first byte in the file
  uint64_t nbytes = 0;
};

class SafetensorsHeader {
 public:
  // Reads and validates the header of the file at `path`. Throws LoadError (kNotFound for a
  // missing file, kInvalidFile for a bad header, kIo for a failed read).
  static SafetensorsHeader read(const std::string& path);

  // Parses the header bytes of a file `file_size` bytes long (the JSON text alone, without the
  // length prefix); `file` names it in errors. Used by `read` and by tests.
  static SafetensorsHeader parse(std::string_view json, uint64_t file_size, const std::string& file);

  const std::string& file() const { return file_; }
  uint64_t file_size() const { return file_size_; }
  uint64_t data_offset() const { return data_offset_; }  // where tensor data starts
  // In file order (by offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when the file has no tensor of that name.
  const TensorInfo* find(const std::string& name) const;

 private:
  std::string file_;
  uint64_t file_size_ = 0;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> by_name_;
};

// Bytes per element of a safetensors dtype name; 0 for a name we do not know.
uint64_t dtype_size(std::string_view dtype);

}  // namespace rtpllm::loader
