// A small JSON reader for safetensors headers: objects, arrays, strings, integers, booleans and
// null. Integers are kept exactly (uint64 offsets do not survive a trip through double); other
// numbers are accepted and kept as text. Throws std::invalid_argument with the byte position of
// the first problem.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace rtpllm::loader {

class JsonValue {
 public:
  enum class Type { kNull, kBool, kInteger, kNumber, kString, kArray, kObject };

  static JsonValue parse(std::string_view text);

  Type type() const { return type_; }
  bool is_object() const { return type_ == Type::kObject; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_integer() const { return type_ == Type::kInteger; }
  bool is_uint() const { return type_ == Type::kInteger && !negative_; }

  // Accessors throw std::invalid_argument when the value has another type.
  const std::string& as_string() const;
  // Only non-negative integers appear in safetensors headers (shapes and offsets).
  uint64_t as_uint() const;
  const std::vector<JsonValue>& as_array() const;
  // Members in the order of the text (safetensors writers sort them; we do not rely on it).
  const std::vector<std::pair<std::string, JsonValue>>& as_object() const;
  // nullptr when the object has no such member.
  const JsonValue* find(const std::string& key) const;

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool negative_ = false;
  uint64_t integer_ = 0;
  std::string text_;  // string contents, or the literal of a non-integer number
  std::vector<JsonValue> array_;
  std::vector<std::pair<std::string, JsonValue>> object_;
};

}  // namespace rtpllm::loader
