// The one exception the loader throws. Its message always names the file (and the tensor where
// one is involved); `kind` tells the bindings which Python exception to raise.
#pragma once

#include <stdexcept>
#include <string>

namespace rtpllm::loader {

enum class LoadErrorKind {
  kNotFound,     // a file that is not there (FileNotFoundError)
  kInvalidFile,  // a file whose contents contradict themselves or the request (ValueError)
  kBadRequest,   // a request that does not fit the tensor it names (ValueError)
  kIo,           // the operating system refused a read (OSError)
};

class LoadError : public std::runtime_error {
 public:
  LoadError(LoadErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  LoadErrorKind kind() const { return kind_; }

 private:
  LoadErrorKind kind_;
};

}  // namespace rtpllm::loader
