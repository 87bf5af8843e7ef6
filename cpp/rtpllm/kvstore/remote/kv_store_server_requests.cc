// The store's requests: PIN (with blocks read back from disk first when needed), UNPIN, RESERVE,
// COMMIT, and the write-through of committed blocks to the disk tier.
#include <unistd.h>

#include <stdexcept>

#include "rtpllm/kvstore/remote/kv_store_server_impl.h"

namespace rtpllm {

// False (after an ERROR reply) when the request is not acceptable; the connection stays.
bool KVStoreServer::Impl::check_request(Client& client, const StoreBlockRequest& request, bool in_use) {
  if (request.hashes.empty() || static_cast<int64_t>(request.hashes.size()) > options.max_blocks_per_request) {
    send_error(client, request.request_id, "hashes: " + std::to_string(request.hashes.size()) +
                                               " blocks; a request names at least 1 and at most " +
                                               std::to_string(options.max_blocks_per_request));
    return false;
  }
  if (in_use) {
    send_error(client, request.request_id, "request_id " + std::to_string(request.request_id) + " is in use");
    return false;
  }
  return true;
}

bool KVStoreServer::Impl::handle_pin(uint64_t client_id, Client& client, const StoreBlockRequest& request) {
  bool in_use = client.pins.count(request.request_id) > 0;
  for (const DiskPin& p : disk_pins) in_use = in_use || (p.client == client_id && p.request_id == request.request_id);
  if (!check_request(client, request, in_use)) return true;
  client.expired_pins.erase(request.request_id);  // the id is reused: a later UNPIN is for the new pin
  ++stats.pin_requests;
  DiskPin pin{client_id, request.request_id, request.hashes, std::vector<int32_t>(request.hashes.size(), -1), {}, {}, 0};
  std::string missing;
  for (size_t i = 0; i < request.hashes.size() && missing.empty(); ++i) {
    const BlockHash hash = request.hashes[i];
    pin.slots[i] = index->pin(hash);
    if (pin.slots[i] >= 0) continue;
    if (disk && on_disk.count(hash) && disk->contains(hash)) {
      pin.disk_positions.push_back(i);
      continue;
    }
    on_disk.erase(hash);
    refresh(hash);
    missing = "block " + store_hex(hash) + " is not held by the store (evicted, or never saved)";
  }
  for (size_t k = 0; k < pin.disk_positions.size() && missing.empty(); ++k) {
    std::vector<BlockHash> evicted;
    const int32_t slot = index->reserve(&evicted);
    if (slot < 0) missing = "every slot of the store is pinned or being written";
    else pin.disk_slots.push_back(slot);
  }
  if (!missing.empty()) {
    for (int32_t slot : pin.slots) {
      if (slot >= 0) index->unpin(slot);
    }
    for (int32_t slot : pin.disk_slots) index->abandon(slot);
    ++stats.pin_misses;
    return send(client, encode_store_slots(StoreMessage::PINNED, {request.request_id, {}, missing}));
  }
  if (pin.disk_positions.empty()) {
    stats.pinned_hits += pin.slots.size();
    client.pins.emplace(request.request_id, Pin{pin.slots, Clock::now() + store_seconds(options.pin_lease_s)});
    return send(client, encode_store_slots(StoreMessage::PINNED, {request.request_id, pin.slots, ""}));
  }
  std::vector<BlockHash> disk_hashes;
  for (size_t i : pin.disk_positions) disk_hashes.push_back(pin.hashes[i]);
  pin.handle = disk->load(disk_hashes, pin.disk_slots);
  disk_pins.push_back(std::move(pin));
  return true;
}

void KVStoreServer::Impl::finish_disk_pins() {
  for (size_t p = 0; p < disk_pins.size();) {
    DiskPin& pin = disk_pins[p];
    const TransferState state = disk->poll(pin.handle);
    if (state == TransferState::PENDING) {
      ++p;
      continue;
    }
    std::string error;
    for (size_t k = 0; k < pin.disk_positions.size(); ++k) {
      const BlockHash hash = pin.hashes[pin.disk_positions[k]];
      const int32_t slot = pin.disk_slots[k];
      if (state == TransferState::FAILED) {
        index->abandon(slot);
        on_disk.erase(hash);
        refresh(hash);
        error = "block " + store_hex(hash) + " could not be read back from the store's disk";
        continue;
      }
      ++stats.disk_reads;
      if (index->commit(slot, hash)) {
        index->pin_slot(slot);
        pin.slots[pin.disk_positions[k]] = slot;
      } else {  // saved by a client meanwhile
        pin.slots[pin.disk_positions[k]] = index->pin(hash);
      }
    }
    auto client = clients.find(pin.client);
    if (!error.empty() || client == clients.end()) {
      for (int32_t slot : pin.slots) {
        if (slot >= 0) index->unpin(slot);
      }
      if (!error.empty()) ++stats.pin_misses;
      if (client != clients.end()) send(*client->second, encode_store_slots(StoreMessage::PINNED, {pin.request_id, {}, error}));
    } else {
      stats.pinned_hits += pin.slots.size();
      client->second->pins.emplace(pin.request_id, Pin{pin.slots, Clock::now() + store_seconds(options.pin_lease_s)});
      send(*client->second, encode_store_slots(StoreMessage::PINNED, {pin.request_id, pin.slots, ""}));
    }
    disk_pins.erase(disk_pins.begin() + static_cast<std::ptrdiff_t>(p));
  }
}

bool KVStoreServer::Impl::handle_unpin(Client& client, const StoreRelease& release) {
  auto it = client.pins.find(release.request_id);
  if (it == client.pins.end() && client.expired_pins.erase(release.request_id) > 0) return true;  // the lease dropped it
  if (it == client.pins.end()) {
    return send_error(client, release.request_id, "UNPIN: unknown request_id " + std::to_string(release.request_id));
  }
  for (int32_t slot : it->second.slots) index->unpin(slot);
  client.pins.erase(it);
  return true;
}

void KVStoreServer::Impl::expire_leases(Clock::time_point now) {
  constexpr size_t kExpiredKept = 4096;  // per client: a client that never unpins must not grow the set forever
  for (auto& [id, client] : clients) {
    for (auto it = client->pins.begin(); it != client->pins.end();) {
      if (now < it->second.lease_end) {
        ++it;
        continue;
      }
      for (int32_t slot : it->second.slots) index->unpin(slot);
      ++stats.expired_pins;
      stats.expired_pin_blocks += it->second.slots.size();
      logger("client '" + client->name + "': pin " + std::to_string(it->first) + " of " +
             std::to_string(it->second.slots.size()) + " blocks expired after pin_lease_s=" +
             std::to_string(options.pin_lease_s) + " without an UNPIN");
      if (client->expired_pins.size() >= kExpiredKept) client->expired_pins.erase(client->expired_pins.begin());
      client->expired_pins.insert(it->first);
      it = client->pins.erase(it);
    }
  }
}

bool KVStoreServer::Impl::handle_reserve(Client& client, const StoreBlockRequest& request) {
  if (!check_request(client, request, client.reservations.count(request.request_id) > 0)) return true;
  Reservation reservation{request.hashes, std::vector<int32_t>(request.hashes.size(), -1)};
  std::unordered_set<BlockHash> seen;
  for (size_t i = 0; i < request.hashes.size(); ++i) {
    const BlockHash hash = request.hashes[i];
    if (visible.count(hash) || !seen.insert(hash).second) {
      ++stats.skipped_blocks;
      continue;
    }
    std::vector<BlockHash> evicted;
    reservation.slots[i] = index->reserve(&evicted);
    if (reservation.slots[i] < 0) ++stats.skipped_blocks;
  }
  const std::vector<int32_t> slots = reservation.slots;
  client.reservations.emplace(request.request_id, std::move(reservation));
  return send(client, encode_store_slots(StoreMessage::RESERVED, {request.request_id, slots, ""}));
}

bool KVStoreServer::Impl::handle_commit(Client& client, const StoreRelease& commit) {
  auto it = client.reservations.find(commit.request_id);
  if (it == client.reservations.end()) {
    return send_error(client, commit.request_id, "COMMIT: unknown request_id " + std::to_string(commit.request_id));
  }
  const Reservation& r = it->second;
  const Clock::time_point until = Clock::now() + grace();
  for (size_t i = 0; i < r.slots.size(); ++i) {
    const int32_t slot = r.slots[i];
    if (slot < 0) continue;
    if (!commit.ok) {
      index->abandon_at(slot, until);  // a failed put may still land in it
      continue;
    }
    if (!index->commit(slot, r.hashes[i])) continue;
    ++stats.saved_blocks;
    if (disk) offer_to_disk(slot, r.hashes[i]);
  }
  client.reservations.erase(it);
  return true;
}

void KVStoreServer::Impl::offer_to_disk(int32_t slot, BlockHash hash) {
  index->pin_slot(slot);  // until the disk has copied it
  const uint8_t* data = buffer.data() + static_cast<size_t>(slot) * static_cast<size_t>(layout.block_stride_bytes);
  std::shared_ptr<ReleasedSlots> sink = released;
  if (disk->offer(hash, data, [sink, slot] {
        std::lock_guard<std::mutex> lock(sink->mutex);
        sink->slots.push_back(slot);
        const char byte = 1;
        [[maybe_unused]] ssize_t n = ::write(sink->wake_fd, &byte, 1);
      })) {
    on_disk.insert(hash);
  } else {
    index->unpin(slot);
  }
}

void KVStoreServer::Impl::unpin_released() {
  std::vector<int32_t> slots;
  {
    std::lock_guard<std::mutex> lock(released->mutex);
    slots.swap(released->slots);
  }
  for (int32_t slot : slots) index->unpin(slot);
}

}  // namespace rtpllm
