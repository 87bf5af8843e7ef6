// Test double for the tiers below the GPU pool: an in-memory KVConnector over a FakeKVModel's
// paged cache, with controllable latency, failures, hangs and capacity.
//
// Copies happen when a transfer completes (on the poll that reports its end), not when it is
// submitted, as with a real asynchronous copy engine: a scheduler that reused or evicted a block
// while a transfer still named it would load or save the wrong fingerprints, which the
// FakeKVModel then reports as wrong KV.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "fake_kv_model.h"
#include "rtpllm/kvstore/kv_connector.h"

namespace rtpllm::testing {

class FakeKVConnector : public KVConnector {
 public:
  explicit FakeKVConnector(FakeKVModel* model) : model_(model) {}

  // Controls.
  FakeKVModel* model_;       // whose cache transfers copy from/to (swap it to "restart")
  int32_t latency_polls = 0;  // a transfer ends on its (latency_polls + 1)-th poll
  bool fail_loads = false;    // loads end FAILED
  bool hang_loads = false;    // loads stay PENDING while this is set
  bool throw_on_load = false; // load() refuses
  size_t capacity_blocks = SIZE_MAX;  // least recently saved/loaded beyond this are dropped
  double recompute_seconds_per_block = 0;  // the latest set_recompute_seconds_per_block()

  std::string name() const override { return "fake"; }

  int32_t match(const std::vector<BlockHash>& hashes) override {
    ++stats_.queries;
    stats_.query_blocks += hashes.size();
    int32_t n = 0;
    while (n < static_cast<int32_t>(hashes.size()) && store_.count(hashes[n]) != 0) ++n;
    stats_.hit_blocks += static_cast<uint64_t>(n);
    return n;
  }

  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override {
    if (throw_on_load) throw std::runtime_error("fake: load refused");
    return submit(true, hashes, gpu_blocks);
  }

  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override {
    return submit(false, hashes, gpu_blocks);
  }

  TransferState poll(TransferHandle handle) override {
    const auto it = open_.find(handle);
    if (it == open_.end()) throw std::invalid_argument("fake: unknown handle " + std::to_string(handle));
    Transfer& t = it->second;
    if (t.is_load && hang_loads) return TransferState::PENDING;
    if (t.polls_left-- > 0) return TransferState::PENDING;
    const TransferState end = t.is_load ? finish_load(t) : finish_save(t);
    open_.erase(it);
    return end;
  }

  std::vector<KVTierStats> stats() override {
    stats_.used_blocks = store_.size();
    return {stats_};
  }

  void set_recompute_seconds_per_block(double seconds) override { recompute_seconds_per_block = seconds; }

  size_t num_open_transfers() const { return open_.size(); }
  size_t num_stored_blocks() const { return store_.size(); }
  bool holds(BlockHash hash) const { return store_.count(hash) != 0; }
  void drop_all() { store_.clear(); lru_.clear(); }

 private:
  struct Transfer {
    bool is_load;
    std::vector<BlockHash> hashes;
    std::vector<BlockId> blocks;
    int32_t polls_left;
  };
  struct Stored {
    std::vector<uint64_t> kv;
    std::list<BlockHash>::iterator lru;
  };

  TransferHandle submit(bool is_load, const std::vector<BlockHash>& hashes, const std::vector<BlockId>& blocks) {
    if (hashes.size() != blocks.size()) throw std::invalid_argument("fake: hashes and gpu_blocks differ in size");
    open_[next_handle_] = Transfer{is_load, hashes, blocks, latency_polls};
    return next_handle_++;
  }

  TransferState finish_load(const Transfer& t) {
    if (fail_loads) {
      ++stats_.failed_loads;
      return TransferState::FAILED;
    }
    for (const BlockHash h : t.hashes) {
      if (store_.count(h) == 0) {  // dropped since match(): the load fails as a whole
        ++stats_.failed_loads;
        return TransferState::FAILED;
      }
    }
    for (size_t i = 0; i < t.hashes.size(); ++i) {
      model_->write_block(t.blocks[i], store_.at(t.hashes[i]).kv);
      touch(t.hashes[i]);
    }
    stats_.loaded_blocks += t.hashes.size();
    return TransferState::DONE;
  }

  TransferState finish_save(const Transfer& t) {
    for (size_t i = 0; i < t.hashes.size(); ++i) {
      if (store_.count(t.hashes[i]) != 0) continue;  // already held
      lru_.push_back(t.hashes[i]);
      store_[t.hashes[i]] = Stored{model_->read_block(t.blocks[i]), std::prev(lru_.end())};
      ++stats_.saved_blocks;
      while (store_.size() > capacity_blocks) {
        store_.erase(lru_.front());
        lru_.pop_front();
        ++stats_.evicted_blocks;
      }
    }
    return TransferState::DONE;
  }

  void touch(BlockHash h) {
    Stored& s = store_.at(h);
    lru_.erase(s.lru);
    lru_.push_back(h);
    s.lru = std::prev(lru_.end());
  }

  std::unordered_map<BlockHash, Stored> store_;
  std::list<BlockHash> lru_;  // least recently used first
  std::map<TransferHandle, Transfer> open_;
  TransferHandle next_handle_ = 1;
  KVTierStats stats_{};
};

}  // namespace rtpllm::testing
