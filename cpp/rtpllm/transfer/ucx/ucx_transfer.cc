#include "rtpllm/transfer/ucx/ucx_transfer.h"

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

std::chrono::milliseconds seconds_to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

// plan_transfer names its lists src/dst; the caller of put/get knows them as local/remote.
[[noreturn]] void rethrow_with_local_names(const std::invalid_argument& error, bool is_put) {
  std::string message = error.what();
  const std::string src = is_put ? "local_blocks" : "remote_blocks";
  const std::string dst = is_put ? "remote_blocks" : "local_blocks";
  if (message.rfind("src_blocks", 0) == 0) message = src + message.substr(10);
  if (message.rfind("dst_blocks", 0) == 0) message = dst + message.substr(10);
  throw std::invalid_argument(message);
}

}  // namespace

struct UcxTransfer::Peer {
  PeerId id = 0;
  PeerDescriptor remote;
  std::unique_ptr<ControlConnection> connection;
  ucp_ep_h ep = nullptr;
  std::vector<ucp_rkey_h> rkeys;  // parallel to remote.regions
  PeerState state = PeerState::CONNECTED;
  std::string error;
  ucs_status_t endpoint_status = UCS_OK;  // set by UCX's error callback, handled after progress
  SteadyTime last_heard;
  SteadyTime last_sent;

  // The rkey of the region holding [address, address + bytes), or nullptr.
  ucp_rkey_h rkey_for(uint64_t address, uint64_t bytes) const {
    for (size_t i = 0; i < remote.regions.size(); ++i) {
      const RemoteRegion& r = remote.regions[i];
      if (address >= r.base && address + bytes <= r.base + r.length) return rkeys[i];
    }
    return nullptr;
  }
};

struct UcxTransfer::Transfer {
  enum class Phase { QUEUED, ISSUED, FINAL };
  TransferHandle handle = 0;
  PeerId peer = 0;
  bool is_put = true;
  bool notify = false;
  NoticeMessage notice;
  std::vector<CopyOp> copies;
  uint64_t bytes = 0;
  Phase phase = Phase::QUEUED;
  int64_t outstanding = 0;  // UCX requests not yet completed
  std::string error;
  SteadyTime deadline;
};

UcxTransfer::UcxTransfer(TransferOptions options, std::function<void()> thread_init)
    : options_((options.validate(), std::move(options))),
      heartbeat_(std::max<std::chrono::milliseconds>(
          std::chrono::milliseconds(10), std::min(std::chrono::milliseconds(1000), seconds_to_ms(options_.timeout_s / 4)))),
      listener_(options_.listen_host, options_.listen_port) {
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  thread_ = std::thread([this, init = std::move(thread_init)] { run(init); });
}

UcxTransfer::~UcxTransfer() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake();
  thread_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [id, peer] : peers_) {
    if (peer->state == PeerState::CONNECTED) {
      std::string ignored;
      peer->connection->send(MessageType::BYE, "", Clock::now() + std::chrono::milliseconds(100), &ignored);
    }
    fail_peer_locked(*peer, "engine shut down");
  }
  finish_transfers_locked();
  changed_.notify_all();
  close(wake_fd_);
}

void UcxTransfer::register_kv(const KVLayout& layout) {
  check_layout(layout);
  std::lock_guard<std::mutex> lock(mutex_);
  if (registration_) throw std::runtime_error("register_kv: this engine already registered its KV memory");
  registration_ = std::make_unique<UcxRegistration>(ucx_.context(), layout);
  layout_ = layout;
  PeerDescriptor self;
  self.name = options_.name;
  self.identity = options_.identity;
  self.worker_address = ucx_.address();
  self.layout = layout;
  self.regions = registration_->regions();
  descriptor_ = encode_descriptor(self);
}

int32_t UcxTransfer::listen_port() const { return listener_.port(); }

std::string UcxTransfer::refusal_reason(const PeerDescriptor& remote) const {
  if (descriptor_.empty()) return "not ready: the engine has not registered its KV memory";
  if (remote.identity != options_.identity) {
    return "cache identity mismatch: this engine has '" + options_.identity + "', the peer '" + remote.identity + "'";
  }
  if (remote.worker_address.empty()) return "the peer sent no UCX worker address";
  try {
    check_layout(remote.layout);
    check_compatible(layout_, remote.layout);
  } catch (const std::invalid_argument& error) {
    return std::string("incompatible KV layout: ") + error.what();
  }
  // Every plane the peer may address must lie in a region it sent a key for.
  const uint64_t plane = static_cast<uint64_t>(remote.layout.num_blocks - 1) * remote.layout.block_stride_bytes +
                         remote.layout.block_bytes();
  for (const KVLayerAddress& a : remote.layout.layers) {
    for (uint64_t base : {a.k_base, a.v_base}) {
      const bool covered = std::any_of(remote.regions.begin(), remote.regions.end(), [&](const RemoteRegion& r) {
        return base >= r.base && base + plane <= r.base + r.length;
      });
      if (!covered) return "the peer's registered regions do not cover its KV layout";
    }
  }
  return "";
}

PeerId UcxTransfer::add_peer_locked(ControlConnection connection, PeerDescriptor remote) {
  auto peer = std::make_unique<Peer>();
  peer->id = next_peer_++;
  peer->remote = std::move(remote);
  peer->connection = std::make_unique<ControlConnection>(std::move(connection));
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(peer->remote.worker_address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // a dead peer fails its requests instead of hanging them
  params.err_handler.cb = &UcxTransfer::on_endpoint_error;
  params.err_handler.arg = peer.get();
  check_ucs(ucp_ep_create(ucx_.worker(), &params, &peer->ep), "ucp_ep_create");
  for (const RemoteRegion& region : peer->remote.regions) {
    ucp_rkey_h rkey = nullptr;
    const ucs_status_t status = ucp_ep_rkey_unpack(peer->ep, region.rkey.data(), &rkey);
    if (status != UCS_OK) {
      close_endpoint_locked(*peer);
      check_ucs(status, "ucp_ep_rkey_unpack");
    }
    peer->rkeys.push_back(rkey);
  }
  peer->last_heard = peer->last_sent = Clock::now();
  const PeerId id = peer->id;
  peers_.emplace(id, std::move(peer));
  return id;
}

PeerId UcxTransfer::connect(const std::string& host, int32_t port) {
  const SteadyTime deadline = Clock::now() + seconds_to_ms(options_.timeout_s);
  const std::string where = host + ":" + std::to_string(port);
  std::string self;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (descriptor_.empty()) throw std::runtime_error("connect: call register_kv before connecting");
    self = descriptor_;
  }
  ControlConnection connection = ControlConnection::connect_to(host, port, deadline);
  std::string error;
  Frame reply;
  if (!connection.send(MessageType::HELLO, self, deadline, &error) || !connection.receive_one(&reply, deadline, &error)) {
    throw std::runtime_error("connect to " + where + ": " + error);
  }
  if (reply.type == MessageType::REFUSE) throw std::runtime_error(where + " refused the connection: " + reply.payload);
  if (reply.type != MessageType::HELLO) throw std::runtime_error("connect to " + where + ": protocol error (no HELLO)");
  PeerDescriptor remote = decode_descriptor(reply.payload);
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_) throw std::runtime_error("connect: the engine is shutting down");
  if (const std::string reason = refusal_reason(remote); !reason.empty()) {
    connection.send(MessageType::REFUSE, reason, deadline, &error);
    throw std::runtime_error("refusing " + where + ": " + reason);
  }
  const PeerId id = add_peer_locked(std::move(connection), std::move(remote));
  wake();
  return id;
}

std::vector<PeerInfo> UcxTransfer::peers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<PeerInfo> out;
  for (const auto& [id, peer] : peers_) {
    out.push_back({id, peer->remote.name, peer->state, peer->error, peer->remote.layout});
  }
  return out;
}

void UcxTransfer::disconnect(PeerId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = peers_.find(id);
  if (it == peers_.end() || it->second->state != PeerState::CONNECTED) return;
  std::string ignored;
  it->second->connection->send(MessageType::BYE, "", Clock::now() + std::chrono::milliseconds(100), &ignored);
  fail_peer_locked(*it->second, "disconnected by this engine");
  finish_transfers_locked();
}

TransferHandle UcxTransfer::put(PeerId peer, const TransferRequest& request) { return submit(peer, request, true); }

TransferHandle UcxTransfer::get(PeerId peer, const TransferRequest& request) { return submit(peer, request, false); }

TransferHandle UcxTransfer::submit(PeerId peer_id, const TransferRequest& request, bool is_put) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) throw std::invalid_argument("peer: unknown peer id " + std::to_string(peer_id));
  const Peer& peer = *it->second;
  if (peer.state != PeerState::CONNECTED) {
    throw std::runtime_error("peer " + std::to_string(peer_id) + " ('" + peer.remote.name + "') failed: " + peer.error);
  }
  const size_t limit = static_cast<size_t>(options_.max_blocks_per_transfer);
  for (const auto& [field, blocks] : {std::pair<const char*, const std::vector<BlockId>*>{"local_blocks", &request.local_blocks},
                                     {"remote_blocks", &request.remote_blocks}}) {
    if (blocks->size() > limit) {
      throw std::invalid_argument(std::string(field) + ": " + std::to_string(blocks->size()) +
                                  " blocks exceed max_blocks_per_transfer (" + std::to_string(limit) + ")");
    }
  }
  if (request.num_tokens < -1) throw std::invalid_argument("num_tokens: must be positive or -1 (every token)");
  const int64_t num_tokens = request.num_tokens < 0
                                 ? static_cast<int64_t>(request.local_blocks.size()) * layout_.block_size
                                 : request.num_tokens;
  const KVLayout& remote = peer.remote.layout;
  auto transfer = std::make_unique<Transfer>();
  try {
    const std::vector<TransferSegment> segments =
        is_put ? plan_transfer(layout_, request.local_blocks, remote, request.remote_blocks, num_tokens)
               : plan_transfer(remote, request.remote_blocks, layout_, request.local_blocks, num_tokens);
    transfer->copies = is_put ? plan_copies(layout_, remote, segments, request.layer)
                              : plan_copies(remote, layout_, segments, request.layer);
  } catch (const std::invalid_argument& error) {
    rethrow_with_local_names(error, is_put);
  }
  transfer->handle = next_handle_++;
  transfer->peer = peer_id;
  transfer->is_put = is_put;
  transfer->notify = is_put && request.notify;
  transfer->notice = {request.request_id, request.layer, num_tokens, request.remote_blocks};
  for (const CopyOp& copy : transfer->copies) transfer->bytes += copy.bytes;
  transfer->deadline = Clock::now() + seconds_to_ms(options_.timeout_s);
  const TransferHandle handle = transfer->handle;
  transfers_.emplace(handle, std::move(transfer));
  last_activity_ = Clock::now();
  wake();
  return handle;
}

TransferStatus UcxTransfer::poll(TransferHandle handle) { return wait(handle, 0.0); }

TransferStatus UcxTransfer::wait(TransferHandle handle, double timeout_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto it = transfers_.find(handle);
  if (it == transfers_.end()) throw std::invalid_argument("handle: unknown transfer handle " + std::to_string(handle));
  Transfer& transfer = *it->second;
  if (timeout_s > 0) {
    changed_.wait_for(lock, seconds_to_ms(timeout_s), [&] { return transfer.phase == Transfer::Phase::FINAL; });
  }
  if (transfer.phase != Transfer::Phase::FINAL) return {TransferState::PENDING, ""};
  TransferStatus status{transfer.error.empty() ? TransferState::DONE : TransferState::FAILED, transfer.error};
  transfers_.erase(it);
  return status;
}

std::vector<TransferNotice> UcxTransfer::take_notices(double wait_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (notices_.empty() && wait_s > 0) {
    changed_.wait_for(lock, seconds_to_ms(wait_s), [&] { return !notices_.empty() || stopping_; });
  }
  std::vector<TransferNotice> out;
  out.swap(notices_);
  return out;
}

TransferStats UcxTransfer::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

// ---- progress thread ------------------------------------------------------------------------

void UcxTransfer::run(std::function<void()> thread_init) {
  if (thread_init) thread_init();
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      progress_once_locked();
    }
    wait_for_events();
  }
}

void UcxTransfer::progress_once_locked() {
  while (ucp_worker_progress(ucx_.worker()) != 0) {
    last_activity_ = Clock::now();
  }
  for (auto& [id, peer] : peers_) {
    if (peer->state == PeerState::CONNECTED && peer->endpoint_status != UCS_OK) {
      fail_peer_locked(*peer, std::string("UCX endpoint error: ") + ucs_status_string(peer->endpoint_status));
    }
  }
  accept_and_handshake_locked();
  read_peers_locked();
  for (auto& [handle, transfer] : transfers_) {
    if (transfer->phase == Transfer::Phase::QUEUED) issue_locked(*transfer);
  }
  finish_transfers_locked();
}

void UcxTransfer::accept_and_handshake_locked() {
  const SteadyTime now = Clock::now();
  for (int fd = listener_.accept_one(); fd >= 0; fd = listener_.accept_one()) {
    handshakes_.emplace_back(ControlConnection(fd), now + seconds_to_ms(options_.timeout_s));
  }
  for (auto it = handshakes_.begin(); it != handshakes_.end();) {
    ControlConnection& connection = it->first;
    std::vector<Frame> frames;
    std::string error;
    const bool open = connection.receive_available(&frames, &error);
    if (frames.empty()) {
      it = (!open || now > it->second) ? handshakes_.erase(it) : it + 1;  // dropped: closed or silent
      continue;
    }
    const SteadyTime deadline = now + seconds_to_ms(options_.timeout_s);
    std::string reason;
    PeerDescriptor remote;
    if (frames.front().type != MessageType::HELLO) {
      reason = "protocol error: the first message must be HELLO";
    } else {
      try {
        remote = decode_descriptor(frames.front().payload);
        reason = refusal_reason(remote);
      } catch (const std::runtime_error& e) {
        reason = std::string("malformed descriptor: ") + e.what();
      }
    }
    if (reason.empty() && connection.send(MessageType::HELLO, descriptor_, deadline, &error)) {
      try {
        add_peer_locked(std::move(connection), std::move(remote));
      } catch (const std::runtime_error&) {
        // UCX could not reach the peer's worker: dropping the socket tells the peer.
      }
    } else if (!reason.empty()) {
      connection.send(MessageType::REFUSE, reason, deadline, &error);
    }
    it = handshakes_.erase(it);
  }
}

void UcxTransfer::read_peers_locked() {
  const SteadyTime now = Clock::now();
  for (auto& [id, peer_ptr] : peers_) {
    Peer& peer = *peer_ptr;
    if (peer.state != PeerState::CONNECTED) continue;
    std::vector<Frame> frames;
    std::string error;
    const bool open = peer.connection->receive_available(&frames, &error);
    if (!frames.empty()) peer.last_heard = now;
    for (const Frame& frame : frames) {
      if (frame.type == MessageType::NOTICE) {
        try {
          NoticeMessage notice = decode_notice(frame.payload);
          // The receiver acts on these ids (frees or schedules those blocks): they must be ours.
          for (BlockId b : notice.blocks) {
            if (b < 0 || b >= layout_.num_blocks) throw std::runtime_error("block id " + std::to_string(b) + " out of range");
          }
          notices_.push_back({peer.id, notice.request_id, notice.layer, std::move(notice.blocks), notice.num_tokens});
          ++stats_.notices_received;
          changed_.notify_all();
        } catch (const std::runtime_error& e) {
          error = std::string("malformed notice: ") + e.what();
          break;
        }
      } else if (frame.type == MessageType::BYE) {
        error = "connection closed by peer";
        break;
      } else if (frame.type != MessageType::PING) {
        error = "protocol error: unexpected message after the handshake";
        break;
      }
    }
    if (!open || !error.empty()) {
      fail_peer_locked(peer, error);
      continue;
    }
    if (now - peer.last_heard > seconds_to_ms(options_.timeout_s)) {
      fail_peer_locked(peer, "no message from the peer in " + std::to_string(options_.timeout_s) + " s");
      continue;
    }
    if (now - peer.last_sent >= heartbeat_) {
      if (!peer.connection->send(MessageType::PING, "", now + seconds_to_ms(options_.timeout_s), &error)) {
        fail_peer_locked(peer, error);
        continue;
      }
      peer.last_sent = now;
    }
  }
}

void UcxTransfer::issue_locked(Transfer& transfer) {
  transfer.phase = Transfer::Phase::ISSUED;
  Peer& peer = *peers_.at(transfer.peer);
  if (peer.state != PeerState::CONNECTED) {
    transfer.error = "peer '" + peer.remote.name + "' failed: " + peer.error;
    return;
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  param.cb.send = &UcxTransfer::on_request_done;
  param.user_data = &transfer;
  param.memory_type = ucx_memory_type(layout_.memory);
  auto track = [&](ucs_status_ptr_t request) {
    if (UCS_PTR_IS_ERR(request)) {
      transfer.error = std::string("UCX: ") + ucs_status_string(UCS_PTR_STATUS(request));
    } else if (request != nullptr) {
      ++transfer.outstanding;
    }
  };
  for (const CopyOp& copy : transfer.copies) {
    const uint64_t remote = transfer.is_put ? copy.dst : copy.src;
    void* local = reinterpret_cast<void*>(transfer.is_put ? copy.src : copy.dst);
    ucp_rkey_h rkey = peer.rkey_for(remote, copy.bytes);
    if (rkey == nullptr) {
      transfer.error = "remote address outside the peer's registered memory";
      break;
    }
    track(transfer.is_put ? ucp_put_nbx(peer.ep, local, copy.bytes, remote, rkey, &param)
                          : ucp_get_nbx(peer.ep, local, copy.bytes, remote, rkey, &param));
    if (!transfer.error.empty()) break;
  }
  if (transfer.is_put && transfer.error.empty()) {
    // Remote completion of every put on this endpoint before the notice goes out.
    ucp_request_param_t flush{};
    flush.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    flush.cb.send = &UcxTransfer::on_request_done;
    flush.user_data = &transfer;
    track(ucp_ep_flush_nbx(peer.ep, &flush));
  }
  if (!transfer.error.empty() && transfer.outstanding > 0) {
    // Some requests are on the wire and cannot be recalled: only closing the endpoint ends them.
    fail_peer_locked(peer, "transfer " + std::to_string(transfer.handle) + " failed: " + transfer.error);
  }
}

void UcxTransfer::finish_transfers_locked() {
  const SteadyTime now = Clock::now();
  for (auto& [handle, transfer_ptr] : transfers_) {
    Transfer& t = *transfer_ptr;
    if (t.phase != Transfer::Phase::ISSUED) continue;
    Peer& peer = *peers_.at(t.peer);
    if (t.outstanding > 0) {
      if (now > t.deadline) {
        fail_peer_locked(peer, "transfer " + std::to_string(handle) + " timed out after " +
                                   std::to_string(options_.timeout_s) + " s");
      }
      if (t.outstanding > 0) continue;  // closing the endpoint completes its requests
    }
    if (t.error.empty() && t.notify) {
      std::string error;
      if (!peer.connection->send(MessageType::NOTICE, encode_notice(t.notice), now + seconds_to_ms(options_.timeout_s),
                                 &error)) {
        t.error = "sending the completion notice: " + error;
        fail_peer_locked(peer, error);
      }
    }
    t.phase = Transfer::Phase::FINAL;
    if (!t.error.empty()) {
      ++stats_.failed;
    } else if (t.is_put) {
      ++stats_.puts;
      stats_.bytes_put += t.bytes;
    } else {
      ++stats_.gets;
      stats_.bytes_got += t.bytes;
    }
    changed_.notify_all();
  }
}

void UcxTransfer::fail_peer_locked(Peer& peer, const std::string& reason) {
  if (peer.state == PeerState::FAILED) return;
  peer.state = PeerState::FAILED;
  peer.error = reason;
  ++stats_.peers_failed;
  for (auto& [handle, transfer] : transfers_) {
    if (transfer->peer == peer.id && transfer->phase != Transfer::Phase::FINAL && transfer->error.empty()) {
      transfer->error = "peer '" + peer.remote.name + "' failed: " + reason;
    }
  }
  close_endpoint_locked(peer);
  peer.connection.reset();  // the peer's reader sees the close at once
  changed_.notify_all();
}

void UcxTransfer::close_endpoint_locked(Peer& peer) {
  if (peer.ep == nullptr) return;
  for (ucp_rkey_h rkey : peer.rkeys) ucp_rkey_destroy(rkey);
  peer.rkeys.clear();
  // FORCE: no flush with a peer that may be dead; outstanding requests complete with an error.
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t request = ucp_ep_close_nbx(peer.ep, &param);
  if (UCS_PTR_IS_PTR(request)) {
    const SteadyTime deadline = Clock::now() + seconds_to_ms(options_.timeout_s);
    while (ucp_request_check_status(request) == UCS_INPROGRESS && Clock::now() < deadline) {
      ucp_worker_progress(ucx_.worker());
    }
    ucp_request_free(request);
  }
  peer.ep = nullptr;
}

bool UcxTransfer::has_in_flight_locked() const {
  return std::any_of(transfers_.begin(), transfers_.end(),
                     [](const auto& entry) { return entry.second->phase != Transfer::Phase::FINAL; });
}

void UcxTransfer::wait_for_events() {
  std::vector<pollfd> fds;
  int timeout_ms = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    const bool in_flight = has_in_flight_locked();
    // Spin while a transfer is moving: some transports (CUDA IPC) complete without an event. Once
    // nothing has progressed for a while (a slow or dead peer), sleep in short naps instead.
    if (in_flight && Clock::now() - last_activity_ < kSpinWindow) {
      sched_yield();
      return;
    }
    if (ucp_worker_arm(ucx_.worker()) == UCS_ERR_BUSY) return;  // events pending: progress first
    // Idle: wake at least twice per heartbeat to send pings and check deadlines.
    timeout_ms = in_flight ? 1 : static_cast<int>(std::max<int64_t>(1, heartbeat_.count() / 2));
    fds.push_back({wake_fd_, POLLIN, 0});
    fds.push_back({listener_.fd(), POLLIN, 0});
    fds.push_back({ucx_.event_fd(), POLLIN, 0});
    for (const auto& handshake : handshakes_) fds.push_back({handshake.first.fd(), POLLIN, 0});
    for (const auto& [id, peer] : peers_) {
      if (peer->connection) fds.push_back({peer->connection->fd(), POLLIN, 0});
    }
  }
  ::poll(fds.data(), fds.size(), timeout_ms);
  uint64_t drained = 0;
  while (read(wake_fd_, &drained, sizeof(drained)) > 0) {
  }
}

void UcxTransfer::wake() {
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t written = write(wake_fd_, &one, sizeof(one));
}

void UcxTransfer::on_request_done(void* request, ucs_status_t status, void* user_data) {
  auto* transfer = static_cast<Transfer*>(user_data);
  if (status != UCS_OK && transfer->error.empty()) transfer->error = std::string("UCX: ") + ucs_status_string(status);
  --transfer->outstanding;
  ucp_request_free(request);
}

void UcxTransfer::on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<Peer*>(arg)->endpoint_status = status;
}

}  // namespace rtpllm
