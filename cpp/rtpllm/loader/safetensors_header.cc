#include "rtpllm/loader/safetensors_header.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "rtpllm/loader/json_value.h"
#include "rtpllm/loader/load_error.h"

namespace rtpllm::loader {
namespace {

// safetensors itself refuses headers above 100 MB; a larger length means a corrupt prefix.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

[[noreturn]] void invalid(const std::string& file, const std::string& what) {
  throw LoadError(LoadErrorKind::kInvalidFile, file + ": " + what);
}

std::string describe_range(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + ")";
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

void read_exact(int fd, void* out, size_t bytes, uint64_t offset, const std::string& path) {
  auto* dst = static_cast<char*>(out);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t got = ::pread(fd, dst + done, bytes - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw LoadError(LoadErrorKind::kIo, path + ": read failed (" + std::strerror(errno) + ")");
    if (got == 0) invalid(path, "file ends inside its header (truncated)");
    done += static_cast<size_t>(got);
  }
}

TensorInfo parse_tensor(const std::string& file, const std::string& name, const JsonValue& entry,
                        uint64_t data_bytes, uint64_t data_offset) {
  const std::string where = "tensor " + name + ": ";
  if (!entry.is_object()) invalid(file, where + "header entry is not an object");
  const JsonValue* dtype = entry.find("dtype");
  const JsonValue* shape = entry.find("shape");
  const JsonValue* offsets = entry.find("data_offsets");
  if (!dtype || !dtype->is_string()) invalid(file, where + "missing or non-string 'dtype'");
  if (!shape || !shape->is_array()) invalid(file, where + "missing or non-array 'shape'");
  if (!offsets || !offsets->is_array() || offsets->as_array().size() != 2)
    invalid(file, where + "'data_offsets' must be [begin, end]");
  TensorInfo info;
  info.name = name;
  info.dtype = dtype->as_string();
  const uint64_t element_bytes = dtype_size(info.dtype);
  if (element_bytes == 0) invalid(file, where + "unknown dtype '" + info.dtype + "'");
  uint64_t elements = 1;
  for (const JsonValue& dim : shape->as_array()) {
    if (!dim.is_uint()) invalid(file, where + "shape entries must be non-negative integers");
    const uint64_t d = dim.as_uint();
    if (d != 0 && elements > UINT64_MAX / d) invalid(file, where + "shape overflows");
    elements *= d;
    info.shape.push_back(d);
  }
  const auto& range = offsets->as_array();
  if (!range[0].is_uint() || !range[1].is_uint())
    invalid(file, where + "'data_offsets' must be non-negative integers");
  const uint64_t begin = range[0].as_uint();
  const uint64_t end = range[1].as_uint();
  if (end < begin) invalid(file, where + "data_offsets " + describe_range(begin, end) + " end before they begin");
  if (end > data_bytes)
    invalid(file, where + "data_offsets " + describe_range(begin, end) + " reach past the end of the file (" +
                      std::to_string(data_bytes) + " data bytes; the file is truncated or its header is wrong)");
  if (elements > UINT64_MAX / element_bytes || elements * element_bytes != end - begin)
    invalid(file, where + "data_offsets " + describe_range(begin, end) + " hold " + std::to_string(end - begin) +
                      " bytes, but shape x dtype " + info.dtype + " needs " +
                      std::to_string(elements * element_bytes));
  info.offset = data_offset + begin;
  info.nbytes = end - begin;
  return info;
}

}  // namespace

uint64_t dtype_size(std::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2") return 1;
  return 0;
}

SafetensorsHeader SafetensorsHeader::read(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) throw LoadError(LoadErrorKind::kNotFound, path + ": no such file");
    throw LoadError(LoadErrorKind::kIo, path + ": cannot open (" + std::strerror(errno) + ")");
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    throw LoadError(LoadErrorKind::kIo, path + ": cannot stat (" + std::strerror(errno) + ")");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) invalid(path, "only " + std::to_string(file_size) + " bytes: not a safetensors file");
  unsigned char prefix[8];
  read_exact(fd.get(), prefix, 8, 0, path);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | prefix[i];
  if (header_bytes > kMaxHeaderBytes || header_bytes > file_size - 8)
    invalid(path, "header length " + std::to_string(header_bytes) + " does not fit the " +
                      std::to_string(file_size) + "-byte file: not a safetensors file, or truncated");
  std::string json(header_bytes, '\0');
  read_exact(fd.get(), json.data(), header_bytes, 8, path);
  return parse(json, file_size, path);
}

SafetensorsHeader SafetensorsHeader::parse(std::string_view json, uint64_t file_size, const std::string& file) {
  SafetensorsHeader header;
  header.file_ = file;
  header.file_size_ = file_size;
  header.data_offset_ = 8 + json.size();
  if (header.data_offset_ > file_size) invalid(file, "header is longer than the file");
  const uint64_t data_bytes = file_size - header.data_offset_;
  JsonValue root;
  try {
    root = JsonValue::parse(json);
  } catch (const std::invalid_argument& e) {
    invalid(file, std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!root.is_object()) invalid(file, "header is not a JSON object");
  for (const auto& [name, entry] : root.as_object()) {
    if (name == "__metadata__") continue;
    if (header.by_name_.count(name)) invalid(file, "tensor " + name + ": listed twice in the header");
    header.by_name_[name] = header.tensors_.size();
    header.tensors_.push_back(parse_tensor(file, name, entry, data_bytes, header.data_offset_));
  }
  std::sort(header.tensors_.begin(), header.tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.offset < b.offset; });
  uint64_t covered_end = header.data_offset_;  // the furthest byte of any tensor so far
  const TensorInfo* furthest = nullptr;
  for (size_t i = 0; i < header.tensors_.size(); ++i) {
    const TensorInfo& cur = header.tensors_[i];
    header.by_name_[cur.name] = i;
    if (cur.nbytes == 0) continue;
    if (furthest != nullptr && covered_end > cur.offset)
      invalid(file, "tensors " + furthest->name + " and " + cur.name + " overlap in the file (the header lies "
                    "about their data_offsets)");
    covered_end = cur.offset + cur.nbytes;
    furthest = &cur;
  }
  return header;
}

const TensorInfo* SafetensorsHeader::find(const std::string& name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace rtpllm::loader
