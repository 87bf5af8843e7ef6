#include "rtpllm/kvstore/remote/kv_store_server.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <stdexcept>

#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/remote/kv_store_server_impl.h"
#include "rtpllm/transfer/transfer_plan.h"

namespace rtpllm {

void KVStoreServerOptions::validate() const {
  if (capacity_bytes <= 0) throw std::invalid_argument("capacity_bytes: must be positive");
  if (port < 0 || port > 65535) throw std::invalid_argument("port: must be in [0, 65535]");
  if (!disk_dir.empty() && disk_capacity_bytes <= 0) throw std::invalid_argument("disk_capacity_bytes: must be positive");
  if (!(transfer_timeout_s > 0)) throw std::invalid_argument("transfer_timeout_s: must be positive");
  // A client reads its pinned blocks within transfer_timeout_s: a shorter lease could hand a slot
  // to a save while a read of it is still on the wire.
  if (!(pin_lease_s > transfer_timeout_s)) {
    throw std::invalid_argument("pin_lease_s: must exceed transfer_timeout_s (" + std::to_string(transfer_timeout_s) +
                                "), got " + std::to_string(pin_lease_s));
  }
  if (max_blocks_per_request <= 0) throw std::invalid_argument("max_blocks_per_request: must be positive");
  if (max_clients <= 0) throw std::invalid_argument("max_clients: must be positive");
}

KVStoreServer::Impl::Impl(KVStoreServerOptions o, TransferFactory f, KVStoreLogger l)
    : options((o.validate(), std::move(o))),
      make_transfer(std::move(f)),
      logger(l ? std::move(l) : default_kvstore_logger()),
      listener(options.host, options.port),
      released(std::make_shared<ReleasedSlots>()) {
  int fds[2];
  if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) throw std::runtime_error("KVStoreServer: pipe failed");
  wake_read = fds[0];
  wake_write = fds[1];
  released->wake_fd = wake_write;
  thread = std::thread([this] { run(); });
}

KVStoreServer::Impl::~Impl() {
  stopping = true;
  wake();
  thread.join();
  clients.clear();  // closes the sockets: clients see the store gone
  disk.reset();     // releases its pins through `released`, which outlives it
  copy_engine.reset();
  transfer.reset();
  ::close(wake_read);
  ::close(wake_write);
}

void KVStoreServer::Impl::wake() const {
  const char byte = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_write, &byte, 1);
}

StoreClock::duration KVStoreServer::Impl::grace() const {
  return store_seconds(2 * options.transfer_timeout_s);
}

// ---- the thread ----
void KVStoreServer::Impl::run() {
  auto next_sweep = Clock::now() + std::chrono::seconds(10);
  while (!stopping) {
    std::vector<pollfd> fds{{listener.fd(), POLLIN, 0}, {wake_read, POLLIN, 0}};
    int timeout_ms = 200;
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (auto& [id, client] : clients) fds.push_back({client->connection.fd(), POLLIN, 0});
      if (!disk_pins.empty()) timeout_ms = 1;
      else if (index && index->has_deferred()) timeout_ms = 50;
    }
    ::poll(fds.data(), fds.size(), timeout_ms);
    char drain[64];
    while (::read(wake_read, drain, sizeof(drain)) > 0) {
    }
    std::lock_guard<std::mutex> lock(mutex);
    const Clock::time_point now = Clock::now();
    accept_clients(now);
    read_clients(now);
    finish_disk_pins();
    unpin_released();
    expire_leases(now);
    if (index) index->expire(now);
    if (disk && now >= next_sweep) {
      sweep_disk();
      next_sweep = now + std::chrono::seconds(10);
    }
    broadcast_changes();
  }
}

void KVStoreServer::Impl::accept_clients(Clock::time_point now) {
  for (int fd = listener.accept_one(); fd >= 0; fd = listener.accept_one()) {
    auto client = std::make_unique<Client>(ControlConnection(fd));
    if (static_cast<int32_t>(clients.size()) >= options.max_clients) {
      send(*client, encode_store_error(StoreMessage::REFUSE, {0, "the store serves at most " +
                                                                     std::to_string(options.max_clients) + " clients"}));
      ++stats.refused_clients;
      continue;
    }
    client->hello_deadline = now + store_seconds(options.transfer_timeout_s);
    clients.emplace(next_client++, std::move(client));
  }
}

void KVStoreServer::Impl::read_clients(Clock::time_point now) {
  std::vector<uint64_t> gone;
  for (auto& [id, client] : clients) {
    std::vector<Frame> frames;
    std::string error;
    bool alive = client->connection.receive_available(&frames, &error);
    for (const Frame& frame : frames) {
      if (!alive) break;
      try {
        if (frame.type != MessageType::STORE) throw std::runtime_error("not a store frame");
        alive = handle(id, *client, frame.payload);
      } catch (const std::exception& e) {  // malformed: this connection is done
        ++stats.bad_requests;
        logger("dropping client '" + client->name + "': " + e.what());
        send(*client, encode_store_error(StoreMessage::ERROR, {0, std::string("malformed message: ") + e.what()}));
        alive = false;
      }
    }
    if (alive && !client->welcomed && now > client->hello_deadline) alive = false;
    if (!alive) gone.push_back(id);
  }
  for (uint64_t id : gone) drop_client(id);
}

void KVStoreServer::Impl::drop_client(uint64_t id) {
  auto it = clients.find(id);
  Client& client = *it->second;
  if (client.welcomed) logger("client '" + client.name + "' disconnected");
  // Its gets and puts may still be on the wire: keep the slots as they are for a while.
  const Clock::time_point until = Clock::now() + grace();
  for (auto& [request, pin] : client.pins) {
    for (int32_t slot : pin.slots) index->unpin_at(slot, until);
  }
  for (auto& [request, reservation] : client.reservations) {
    for (int32_t slot : reservation.slots) {
      if (slot >= 0) index->abandon_at(slot, until);
    }
  }
  clients.erase(it);
}

bool KVStoreServer::Impl::send(Client& client, const std::string& payload) {
  // A client that does not read its socket must not hold the store up for long.
  std::string error;
  return client.connection.send(MessageType::STORE, payload, Clock::now() + std::chrono::seconds(1), &error);
}

bool KVStoreServer::Impl::send_error(Client& client, uint64_t request_id, const std::string& message) {
  ++stats.bad_requests;
  return send(client, encode_store_error(StoreMessage::ERROR, {request_id, message}));
}

// False: drop the client.
bool KVStoreServer::Impl::handle(uint64_t id, Client& client, const std::string& payload) {
  const StoreMessage type = store_message_type(payload);
  if (!client.welcomed && type != StoreMessage::HELLO) throw std::runtime_error("the first message must be HELLO");
  switch (type) {
    case StoreMessage::HELLO: return handle_hello(client, decode_store_hello(payload));
    case StoreMessage::PIN: return handle_pin(id, client, decode_store_request(payload));
    case StoreMessage::UNPIN: return handle_unpin(client, decode_store_release(payload));
    case StoreMessage::RESERVE: return handle_reserve(client, decode_store_request(payload));
    case StoreMessage::COMMIT: return handle_commit(client, decode_store_release(payload));
    default: throw std::runtime_error("unexpected message type " + std::to_string(static_cast<uint32_t>(type)));
  }
}

bool KVStoreServer::Impl::refuse(Client& client, const std::string& reason) {
  ++stats.refused_clients;
  logger("refused client '" + client.name + "': " + reason);
  send(client, encode_store_error(StoreMessage::REFUSE, {0, reason}));
  return false;
}

bool KVStoreServer::Impl::handle_hello(Client& client, const StoreHello& hello) {
  if (client.welcomed) throw std::runtime_error("HELLO sent twice");
  client.name = hello.name.substr(0, 128);
  if (hello.protocol_version != kStoreProtocolVersion) {
    return refuse(client, "protocol version " + std::to_string(hello.protocol_version) + "; this store speaks " +
                              std::to_string(kStoreProtocolVersion));
  }
  const KVBlockShape& s = hello.shape;
  if (s.num_layers <= 0 || s.block_size <= 0 || s.num_kv_heads <= 0 || s.head_dim <= 0 || s.element_bytes <= 0) {
    return refuse(client, "invalid KV block shape (" + s.describe() + ")");
  }
  if (hello.identity == 0) return refuse(client, "identity: 0 is not a cache identity");
  const uint64_t expected = pool_identity != 0 ? pool_identity : options.identity;
  if (expected != 0 && hello.identity != expected) {
    return refuse(client, "cache identity mismatch: the store holds KV of identity " + store_hex(expected) +
                              ", the client's is " + store_hex(hello.identity) +
                              " (another model, dtype, block size or KV layout)");
  }
  if (pool_identity != 0 && !(s == shape)) {
    return refuse(client, "KV block shape mismatch: the store holds " + shape.describe() + ", the client has " +
                              s.describe());
  }
  if (pool_identity == 0) {
    try {
      build_pool(hello.identity, s);
    } catch (const std::exception& e) {
      return refuse(client, e.what());
    }
  }
  StoreWelcome welcome{transfer->listen_port(), index->num_slots(), options.max_blocks_per_request,
                       options.transfer_timeout_s};
  client.welcomed = true;
  logger("client '" + client.name + "' connected");
  StoreIndexUpdate all;
  all.added.assign(visible.begin(), visible.end());
  all.used_blocks = index->num_held();
  return send(client, encode_store_welcome(welcome)) && send(client, encode_store_index(all));
}

void KVStoreServer::Impl::build_pool(uint64_t identity, const KVBlockShape& s) {
  const int64_t bytes_per_block = s.bytes_per_block();
  const int64_t num_slots = options.capacity_bytes / bytes_per_block;
  if (num_slots <= 0) {
    throw std::runtime_error("capacity_bytes " + std::to_string(options.capacity_bytes) +
                             " holds no block of " + std::to_string(bytes_per_block) + " bytes");
  }
  if (num_slots > INT32_MAX / 2) throw std::runtime_error("capacity_bytes: too many blocks");
  buffer = HostBuffer(std::make_shared<AlignedHostAllocator>(), static_cast<size_t>(num_slots * bytes_per_block));
  layout = make_block_major_layout(reinterpret_cast<uint64_t>(buffer.data()), MemoryKind::HOST,
                                   static_cast<int32_t>(num_slots), s.num_layers, s.block_size, s.num_kv_heads,
                                   s.head_dim, s.element_bytes);
  TransferOptions transfer_options;
  transfer_options.name = "kvstore";
  transfer_options.identity = store_hex(identity);
  transfer_options.listen_host = options.host;
  transfer_options.timeout_s = options.transfer_timeout_s;
  transfer_options.max_blocks_per_transfer = options.max_blocks_per_request;
  transfer = make_transfer(transfer_options);
  transfer->register_kv(layout);
  index = std::make_unique<StoreIndex>(static_cast<int32_t>(num_slots));
  if (!options.disk_dir.empty()) {
    copy_engine = std::make_shared<CpuKVCopyEngine>(layout);
    DiskTierOptions disk_options;
    disk_options.directory = options.disk_dir;
    disk_options.capacity_bytes = options.disk_capacity_bytes;
    disk_options.cache_identity = identity;
    disk = std::make_shared<DiskTier>(copy_engine, disk_options, logger);
    scan_disk();
  }
  shape = s;
  pool_identity = identity;
  logger("serving identity " + store_hex(identity) + " (" + s.describe() + "), " + std::to_string(num_slots) +
         " blocks of " + std::to_string(bytes_per_block) + " bytes in memory" +
         (disk ? ", " + std::to_string(on_disk.size()) + " on disk at " + options.disk_dir : std::string()));
}

// The disk tier indexed the directory's blocks of this identity; learn their hashes.
void KVStoreServer::Impl::scan_disk() {
  DIR* dir = ::opendir(options.disk_dir.c_str());
  if (!dir) return;
  while (dirent* entry = ::readdir(dir)) {
    BlockHash hash = 0;
    if (parse_block_file_name(entry->d_name, &hash) && disk->contains(hash)) {
      on_disk.insert(hash);
      refresh(hash);
    }
  }
  ::closedir(dir);
}

// Forgets disk blocks the disk tier evicted or lost.
void KVStoreServer::Impl::sweep_disk() {
  std::vector<BlockHash> gone;
  for (BlockHash hash : on_disk) {
    if (!disk->contains(hash)) gone.push_back(hash);
  }
  for (BlockHash hash : gone) {
    on_disk.erase(hash);
    refresh(hash);
  }
}

// Keeps `visible` (what clients are told the store holds: memory or disk) current for hash.
void KVStoreServer::Impl::refresh(BlockHash hash) {
  const bool held = index->contains(hash) || on_disk.count(hash) > 0;
  if (held && visible.insert(hash).second) pending_added.push_back(hash);
  if (!held && visible.erase(hash) > 0) pending_removed.push_back(hash);
}

void KVStoreServer::Impl::broadcast_changes() {
  if (!index) return;
  std::vector<BlockHash> added, removed;
  index->take_changes(&added, &removed);
  for (BlockHash hash : added) refresh(hash);
  for (BlockHash hash : removed) refresh(hash);
  if (pending_added.empty() && pending_removed.empty()) return;
  StoreIndexUpdate update{std::move(pending_added), std::move(pending_removed), index->num_held()};
  pending_added.clear();
  pending_removed.clear();
  const std::string payload = encode_store_index(update);
  std::vector<uint64_t> gone;
  for (auto& [id, client] : clients) {
    if (client->welcomed && !send(*client, payload)) gone.push_back(id);
  }
  for (uint64_t id : gone) drop_client(id);
}

KVStoreServer::KVStoreServer(KVStoreServerOptions options, TransferFactory make_transfer, KVStoreLogger logger)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(make_transfer), std::move(logger))) {}

KVStoreServer::~KVStoreServer() = default;

int32_t KVStoreServer::port() const { return impl_->listener.port(); }

KVStoreServerStats KVStoreServer::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  KVStoreServerStats s = impl_->stats;
  s.identity = impl_->pool_identity;
  if (impl_->index) {
    s.shape = impl_->shape.describe();
    s.bytes_per_block = impl_->shape.bytes_per_block();
    s.capacity_blocks = impl_->index->num_slots();
    s.used_blocks = impl_->index->num_held();
    s.pinned_blocks = impl_->index->num_pinned();
    s.evicted_blocks = impl_->index->evictions();
  }
  s.disk_blocks = static_cast<int64_t>(impl_->on_disk.size());
  s.clients = static_cast<int64_t>(impl_->clients.size());
  return s;
}

void KVStoreServer::flush_disk() {
  std::shared_ptr<DiskTier> disk;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    disk = impl_->disk;
  }
  if (disk) disk->flush();
}

void KVStoreServer::check_invariants() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (impl_->index) impl_->index->check_invariants();
}

}  // namespace rtpllm
