// Little-endian byte strings for the control messages (the transfer engine's, the KV store's):
// fixed-size values, length-prefixed byte strings and vectors of trivially copyable items.
// Reading checks every length against what is left, so a truncated or lying message throws
// std::runtime_error ("<what>: truncated") and never makes us allocate what a count claims.
// (Integers are written in host order: every platform we build for is little endian.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace rtpllm {

class ByteWriter {
 public:
  template <typename T>
  void put(T value) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  void put_bytes(const std::string& bytes) {
    put<uint32_t>(static_cast<uint32_t>(bytes.size()));
    out_ += bytes;
  }
  template <typename T>
  void put_vector(const std::vector<T>& items) {
    static_assert(std::is_trivially_copyable_v<T>);
    put<uint32_t>(static_cast<uint32_t>(items.size()));
    if (!items.empty()) out_.append(reinterpret_cast<const char*>(items.data()), items.size() * sizeof(T));
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class ByteReader {
 public:
  // `in` must outlive the reader; `what` names the message kind in errors; reading starts at `pos`.
  ByteReader(const std::string& in, std::string what, size_t pos = 0) : in_(in), what_(std::move(what)), pos_(pos) {
    if (pos_ > in_.size()) fail("truncated");
  }
  template <typename T>
  T get() {
    static_assert(std::is_trivially_copyable_v<T>);
    need(sizeof(T));
    T value;
    std::memcpy(&value, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string get_bytes() {
    const uint32_t size = get<uint32_t>();
    need(size);
    std::string bytes = in_.substr(pos_, size);
    pos_ += size;
    return bytes;
  }
  template <typename T>
  std::vector<T> get_vector() {
    const uint32_t count = get_count(sizeof(T));
    std::vector<T> items(count);
    if (count > 0) std::memcpy(items.data(), in_.data() + pos_, count * sizeof(T));
    pos_ += count * sizeof(T);
    return items;
  }
  // A count of items of at least item_bytes each, which must fit in what is left.
  uint32_t get_count(size_t item_bytes) {
    const uint32_t count = get<uint32_t>();
    need(static_cast<size_t>(count) * item_bytes);
    return count;
  }
  bool at_end() const { return pos_ == in_.size(); }
  void expect_end() const {
    if (pos_ != in_.size()) fail("trailing bytes");
  }

 private:
  void need(size_t bytes) const {
    if (bytes > in_.size() - pos_) fail("truncated");
  }
  [[noreturn]] void fail(const char* why) const { throw std::runtime_error(what_ + ": " + why); }

  const std::string& in_;
  std::string what_;
  size_t pos_;
};

}  // namespace rtpllm
