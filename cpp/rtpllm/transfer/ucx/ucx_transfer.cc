#include "rtpllm/transfer/ucx/ucx_transfer.h"

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <stdexcept>

#include "rtpllm/transfer/ucx/ucx_transfer_state.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

// The plan names its fields src/dst; the caller of put/get knows them as local/remote.
[[noreturn]] void rethrow_with_local_names(const std::invalid_argument& error, bool is_put) {
  std::string message = error.what();
  const std::string local = is_put ? "src_" : "dst_";
  const std::string remote = is_put ? "dst_" : "src_";
  for (const char* field : {"blocks", "head_offset"}) {
    if (message.rfind(local + field, 0) == 0) message = "local_" + message.substr(4);
    if (message.rfind(remote + field, 0) == 0) message = "remote_" + message.substr(4);
  }
  throw std::invalid_argument(message);
}

// The request's heads as the plan sees them (src: the side the bytes leave).
HeadSlice head_slice(const TransferRequest& request, bool is_put) {
  return is_put ? HeadSlice{request.local_head_offset, request.remote_head_offset, request.num_heads}
                : HeadSlice{request.remote_head_offset, request.local_head_offset, request.num_heads};
}

}  // namespace

UcxTransfer::UcxTransfer(TransferOptions options, std::function<void()> thread_init,
                         std::shared_ptr<PeerMemory> peer_memory)
    : options_((options.validate(), std::move(options))),
      heartbeat_(std::max<std::chrono::milliseconds>(
          std::chrono::milliseconds(10), std::min(std::chrono::milliseconds(1000), ucx_seconds_to_ms(options_.timeout_s / 4)))),
      peer_memory_(std::move(peer_memory)),
      listener_(options_.listen_host, options_.listen_port) {
  if (options_.data_path == DataPath::DIRECT && !peer_memory_) {
    throw std::invalid_argument("data_path: DIRECT needs access to peers' memory (a CUDA device: cuda_device=...)");
  }
  key_state_ = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  register_message_handlers();
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  notice_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
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
  // Their endpoints close once their requests ended, at the latest after the grace.
  for (;;) {
    close_failed_endpoints_locked();
    const bool open = std::any_of(peers_.begin(), peers_.end(), [](const auto& entry) { return entry.second->ep; });
    if (!open) break;
    ucp_worker_progress(ucx_.worker());
  }
  finish_transfers_locked();
  changed_.notify_all();
  close(wake_fd_);
  close(notice_fd_);
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
  if (peer_memory_ && peer_memory_->supports(layout.memory)) {
    try {
      for (RemoteRegion& region : self.regions) region.exported = peer_memory_->export_region(region.base, region.length);
      self.memory_scope = peer_memory_->scope();
    } catch (const std::runtime_error&) {
      for (RemoteRegion& region : self.regions) region.exported.clear();  // peers use UCX then
    }
  }
  self.requires_write_grants = options_.require_write_grants;
  descriptor_ = encode_descriptor(self);
}

int32_t UcxTransfer::listen_port() const { return listener_.port(); }

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
    const HeadSlice heads = head_slice(request, is_put);
    transfer->copies = is_put ? plan_copies(layout_, remote, segments, request.layer, heads)
                              : plan_copies(remote, layout_, segments, request.layer, heads);
  } catch (const std::invalid_argument& error) {
    rethrow_with_local_names(error, is_put);
  }
  transfer->handle = next_handle_++;
  transfer->peer = peer_id;
  transfer->is_put = is_put;
  transfer->notify = is_put && request.notify;
  if (request.payload.size() > kMaxNoticePayloadBytes) {
    throw std::invalid_argument("payload: " + std::to_string(request.payload.size()) + " bytes, more than " +
                                std::to_string(kMaxNoticePayloadBytes));
  }
  transfer->notice = {request.request_id, request.layer, num_tokens, request.remote_blocks, request.payload};
  for (const CopyOp& copy : transfer->copies) transfer->bytes += copy.bytes;
  transfer->deadline = Clock::now() + ucx_seconds_to_ms(options_.timeout_s);
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
    changed_.wait_for(lock, ucx_seconds_to_ms(timeout_s), [&] { return transfer.phase == Transfer::Phase::FINAL; });
  }
  if (transfer.phase != Transfer::Phase::FINAL) return {TransferState::PENDING, ""};
  TransferStatus status{transfer.error.empty() ? TransferState::DONE : TransferState::FAILED, transfer.error};
  transfers_.erase(it);
  return status;
}

std::vector<TransferNotice> UcxTransfer::take_notices(double wait_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (notices_.empty() && wait_s > 0) {
    changed_.wait_for(lock, ucx_seconds_to_ms(wait_s), [&] { return !notices_.empty() || stopping_; });
  }
  std::vector<TransferNotice> out;
  out.swap(notices_);
  if (!out.empty()) {
    uint64_t drained = 0;
    [[maybe_unused]] ssize_t got = read(notice_fd_, &drained, sizeof(drained));  // unreadable until the next notice
  }
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
  // A peer that hung up is failed (its endpoint force-closed) before each worker progress call
  // reads more of its bytes: see fail_hung_up_peers_locked.
  fail_hung_up_peers_locked();
  while (ucp_worker_progress(ucx_.worker()) != 0) {
    last_activity_ = Clock::now();
    fail_hung_up_peers_locked();
  }
  for (auto& [id, peer] : peers_) {
    if (peer->state != PeerState::CONNECTED) continue;
    if (peer->endpoint_status != UCS_OK) {
      fail_peer_locked(*peer, std::string("UCX endpoint error: ") + ucs_status_string(peer->endpoint_status));
    } else if (!peer->protocol_error.empty()) {
      fail_peer_locked(*peer, "protocol error: " + peer->protocol_error);
    }
  }
  close_failed_endpoints_locked();
  answer_peers_locked();
  accept_and_handshake_locked();
  read_peers_locked();
  for (auto& [handle, transfer] : transfers_) {
    if (transfer->phase != Transfer::Phase::QUEUED) continue;
    const Peer& peer = *peers_.at(transfer->peer);
    const bool ready = peer.knows_us || peer.data_path != DataPath::MESSAGES || peer.state != PeerState::CONNECTED;
    if (ready && granted_locked(*transfer)) issue_locked(*transfer);
  }
  continue_gets_locked();
  for (auto& [id, peer] : peers_) peer->grant_answers.clear();  // each answers the puts queued when it came
  finish_transfers_locked();
}

void UcxTransfer::issue_locked(Transfer& transfer) {
  transfer.phase = Transfer::Phase::ISSUED;
  Peer& peer = *peers_.at(transfer.peer);
  if (peer.state != PeerState::CONNECTED) {
    transfer.error = "peer '" + peer.remote.name + "' failed: " + peer.error;
    return;
  }
  if (peer.data_path == DataPath::MESSAGES) {
    issue_as_messages_locked(transfer, peer);
    return;
  }
  if (peer.data_path == DataPath::DIRECT) {
    issue_direct_locked(transfer, peer);
    return;
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  param.cb.send = &UcxTransfer::on_request_done;
  param.user_data = &transfer;
  param.memory_type = ucx_memory_type(layout_.memory);
  for (const CopyOp& copy : transfer.copies) {
    const uint64_t remote = transfer.is_put ? copy.dst : copy.src;
    void* local = reinterpret_cast<void*>(transfer.is_put ? copy.src : copy.dst);
    ucp_rkey_h rkey = peer.rkey_for(remote, copy.bytes);
    if (rkey == nullptr) {
      transfer.error = "remote address outside the peer's registered memory";
      break;
    }
    const bool ok = transfer.track(transfer.is_put ? ucp_put_nbx(peer.ep, local, copy.bytes, remote, rkey, &param)
                                                   : ucp_get_nbx(peer.ep, local, copy.bytes, remote, rkey, &param));
    if (!ok) break;
  }
  if (transfer.is_put && transfer.error.empty()) {
    // Remote completion of every put on this endpoint before the notice goes out.
    ucp_request_param_t flush{};
    flush.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    flush.cb.send = &UcxTransfer::on_request_done;
    flush.user_data = &transfer;
    transfer.track(ucp_ep_flush_nbx(peer.ep, &flush));
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
    // A direct copy cannot be recalled: the transfer stays unfinished until it ended, error or not.
    if (t.direct_ticket != 0 && !direct_copy_ended_locked(t)) continue;
    Peer& peer = *peers_.at(t.peer);
    if (t.outstanding > 0 || (t.error.empty() && !landed_locked(t, peer))) {
      if (now > t.deadline) {
        fail_peer_locked(peer, "transfer " + std::to_string(handle) + " timed out after " +
                                   std::to_string(options_.timeout_s) + " s");
      }
      // Closing the endpoint completes its requests; a failed peer sets the error.
      if (t.outstanding > 0 || t.error.empty()) continue;
    }
    if (t.error.empty() && t.notify && !t.by_messages) {  // by messages, the receiver notices itself
      std::string error;
      if (!peer.connection->send(MessageType::NOTICE, encode_notice(t.notice), now + ucx_seconds_to_ms(options_.timeout_s),
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

}  // namespace rtpllm
