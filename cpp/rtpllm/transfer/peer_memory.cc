#include "rtpllm/transfer/peer_memory.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>

#include "rtpllm/core/byte_codec.h"

namespace rtpllm {

std::string host_scope() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  std::string boot_id;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot_id;  // empty where there is none
  return std::string(name) + "|" + boot_id;
}

const std::string& process_nonce() {
  static const std::string nonce = [] {
    std::random_device random;
    char hex[33];
    std::snprintf(hex, sizeof(hex), "%08x%08x%08x%08x", random(), random(), random(), random());
    return std::string(hex);
  }();
  return nonce;
}

namespace {

class InProcessPeerMemory final : public PeerMemory {
 public:
  std::string scope() const override { return host_scope() + "|process " + process_nonce(); }

  bool supports(MemoryKind kind) const override { return kind == MemoryKind::HOST; }

  std::string export_region(uint64_t base, uint64_t length) override {
    ByteWriter w;
    w.put<uint64_t>(base);
    w.put<uint64_t>(length);
    return w.take();
  }

  uint64_t map(const std::string& exported, uint64_t length) override {
    ByteReader r(exported, "malformed in-process export");
    const uint64_t base = r.get<uint64_t>();
    const uint64_t exported_length = r.get<uint64_t>();
    r.expect_end();
    if (length > exported_length) {
      throw std::runtime_error("the region is " + std::to_string(length) + " bytes, its export " +
                               std::to_string(exported_length));
    }
    return base;
  }

  void unmap(uint64_t) noexcept override {}

  uint64_t copy(const std::vector<CopyOp>& copies) override {
    for (const CopyOp& c : copies) {
      std::memmove(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes);
    }
    return ++tickets_;
  }

  bool done(uint64_t) override { return true; }
  void drain() noexcept override {}

 private:
  uint64_t tickets_ = 0;
};

}  // namespace

std::unique_ptr<PeerMemory> make_in_process_peer_memory() { return std::make_unique<InProcessPeerMemory>(); }

}  // namespace rtpllm
