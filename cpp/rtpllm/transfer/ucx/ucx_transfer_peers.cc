// UcxTransfer's connections: the descriptor exchange (both directions), peer checks, heartbeats,
// and failing a peer (its endpoint force-closed, its transfers failed).
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "rtpllm/transfer/ucx/ucx_transfer_state.h"

namespace rtpllm {
namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

std::string UcxTransfer::refusal_reason(const PeerDescriptor& remote) const {
  if (descriptor_.empty()) return "not ready: the engine has not registered its KV memory";
  if (remote.identity != options_.identity) {
    return "cache identity mismatch: this engine has '" + options_.identity + "', the peer '" + remote.identity + "'";
  }
  if (remote.worker_address.empty()) return "the peer sent no UCX worker address";
  if (remote.connection_key != 0) {
    for (const auto& [id, peer] : peers_) {
      if (peer->key == remote.connection_key) return "a connection with this key exists already";
    }
  }
  try {
    check_layout(remote.layout);
    check_compatible(layout_, remote.layout);
  } catch (const std::invalid_argument& error) {
    return std::string("incompatible KV layout: ") + error.what();
  }
  if (options_.data_path == DataPath::DIRECT) {
    if (const std::string why = direct_obstacle(remote); !why.empty()) return "data_path DIRECT: " + why;
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

PeerId UcxTransfer::add_peer_locked(ControlConnection connection, PeerDescriptor remote, bool connected) {
  auto peer = std::make_unique<Peer>();
  peer->id = next_peer_++;
  peer->remote = std::move(remote);
  peer->key = peer->remote.connection_key;
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
  // AUTO maps a peer's memory only on the side that dialled it: the writers dial (a prefill its
  // decode instance, an instance its store), and an acceptor (a decode instance with a connection
  // per prefill engine) would map memory it never writes, holding up its progress thread meanwhile.
  std::string not_direct;
  const bool direct = options_.data_path == DataPath::DIRECT || (options_.data_path == DataPath::AUTO && connected);
  const bool mapped = direct && map_peer_locked(*peer, &not_direct);
  peer->data_path = mapped ? DataPath::DIRECT : data_path_for(peer->ep);
  peer->last_heard = peer->last_sent = Clock::now();
  const PeerId id = peer->id;
  Peer& added = *peers_.emplace(id, std::move(peer)).first->second;
  // Forced DIRECT passed direct_obstacle at the handshake; a map that failed after it fails the peer.
  if (options_.data_path == DataPath::DIRECT && !mapped) {
    fail_peer_locked(added, "data_path DIRECT: " + not_direct);
  }
  return id;
}

PeerId UcxTransfer::connect(const std::string& host, int32_t port) {
  const SteadyTime deadline = Clock::now() + ucx_seconds_to_ms(options_.timeout_s);
  const std::string where = host + ":" + std::to_string(port);
  std::string self;
  uint64_t key = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (descriptor_.empty()) throw std::runtime_error("connect: call register_kv before connecting");
    PeerDescriptor descriptor = decode_descriptor(descriptor_);
    while (key == 0) {  // splitmix64: distinct keys without a lock-free generator
      uint64_t z = (key_state_ += 0x9e3779b97f4a7c15ULL);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      key = z ^ (z >> 31);
    }
    descriptor.connection_key = key;
    self = encode_descriptor(descriptor);
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
  remote.connection_key = key;  // the acceptor adopted ours
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_) throw std::runtime_error("connect: the engine is shutting down");
  if (const std::string reason = refusal_reason(remote); !reason.empty()) {
    connection.send(MessageType::REFUSE, reason, deadline, &error);
    throw std::runtime_error("refusing " + where + ": " + reason);
  }
  const PeerId id = add_peer_locked(std::move(connection), std::move(remote), /*connected=*/true);
  Peer& peer = *peers_.at(id);
  if (peer.state == PeerState::FAILED) throw std::runtime_error("connect to " + where + ": " + peer.error);
  peer.knows_us = true;
  // Tells the acceptor that this side has its entry too (Peer::knows_us).
  if (!peer.connection->send(MessageType::PING, "", deadline, &error)) fail_peer_locked(peer, error);
  peer.last_sent = Clock::now();
  wake();
  return id;
}

std::vector<PeerInfo> UcxTransfer::peers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<PeerInfo> out;
  for (const auto& [id, peer] : peers_) {
    out.push_back({id, peer->remote.name, peer->state, peer->error, peer->remote.layout, peer->data_path});
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

void UcxTransfer::accept_and_handshake_locked() {
  const SteadyTime now = Clock::now();
  for (int fd = listener_.accept_one(); fd >= 0; fd = listener_.accept_one()) {
    handshakes_.emplace_back(ControlConnection(fd), now + ucx_seconds_to_ms(options_.timeout_s));
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
    const SteadyTime deadline = now + ucx_seconds_to_ms(options_.timeout_s);
    std::string reason;
    PeerDescriptor remote;
    if (frames.front().type != MessageType::HELLO) {
      reason = "protocol error: the first message must be HELLO";
    } else {
      try {
        remote = decode_descriptor(frames.front().payload);
        reason = remote.connection_key == 0 ? "the connecting peer sent no connection key" : refusal_reason(remote);
      } catch (const std::runtime_error& e) {
        reason = std::string("malformed descriptor: ") + e.what();
      }
    }
    if (reason.empty() && connection.send(MessageType::HELLO, descriptor_, deadline, &error)) {
      try {
        add_peer_locked(std::move(connection), std::move(remote), /*connected=*/false);
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
    if (!frames.empty()) {
      peer.last_heard = now;
      peer.knows_us = true;
    }
    for (const Frame& frame : frames) {
      if (frame.type == MessageType::NOTICE) {
        try {
          push_notice_locked(peer, decode_notice(frame.payload));
        } catch (const std::runtime_error& e) {
          error = std::string("malformed notice: ") + e.what();
          break;
        }
      } else if (frame.type == MessageType::PUT_ACK) {
        try {
          const uint64_t sequence = decode_put_ack(frame.payload);
          if (sequence >= peer.next_put_sequence) throw std::runtime_error("acknowledges a put never sent");
          peer.acked_sequence = std::max(peer.acked_sequence, sequence);
        } catch (const std::runtime_error& e) {
          error = std::string("malformed put acknowledgement: ") + e.what();
          break;
        }
      } else if (frame.type == MessageType::GRANT_QUERY) {
        answer_grant_query_locked(peer, frame.payload, &error);
        if (!error.empty()) break;
      } else if (frame.type == MessageType::GRANT) {
        try {
          on_grant_locked(peer, frame.payload);
        } catch (const std::runtime_error& e) {
          error = std::string("malformed write grant: ") + e.what();
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
    if (now - peer.last_heard > ucx_seconds_to_ms(options_.timeout_s)) {
      fail_peer_locked(peer, "no message from the peer in " + std::to_string(options_.timeout_s) + " s");
      continue;
    }
    if (now - peer.last_sent >= heartbeat_) {
      if (!peer.connection->send(MessageType::PING, "", now + ucx_seconds_to_ms(options_.timeout_s), &error)) {
        fail_peer_locked(peer, error);
        continue;
      }
      peer.last_sent = now;
    }
  }
}

void UcxTransfer::push_notice_locked(const Peer& peer, NoticeMessage notice) {
  // The receiver acts on these ids (frees or schedules those blocks): they must be ours.
  for (BlockId b : notice.blocks) {
    if (b < 0 || b >= layout_.num_blocks) throw std::runtime_error("block id " + std::to_string(b) + " out of range");
  }
  if (notices_.empty()) {  // notice_fd() becomes readable
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t written = write(notice_fd_, &one, sizeof(one));
  }
  notices_.push_back({peer.id, notice.request_id, notice.layer, std::move(notice.blocks), notice.num_tokens,
                      std::move(notice.payload)});
  ++stats_.notices_received;
  changed_.notify_all();
}

// Why this runs before every ucp_worker_progress call: a dead peer is failed, its endpoint
// force-closed and its unread bytes dropped, before the worker dispatches any more of them. That
// matters most where a peer uses RMA over TCP (DataPath::RMA forced): UCX emulates it with messages
// this engine answers from inside ucp_worker_progress, and UCX 1.22 aborts the process when such
// an answer meets a peer that is gone (ucp_progress_rma_cmpl / ucp_progress_get_reply hand the
// transport's error to ucp_request_try_send: ucs_fatal "unexpected error: Endpoint timeout"); this
// check narrows that window, only DataPath::MESSAGES closes it. A killed peer's control socket
// hangs up together with its UCX sockets, so a hung-up control connection is the signal. One
// poll(2) without a wait: cheap enough for the spinning progress loop.
void UcxTransfer::fail_hung_up_peers_locked() {
  hangup_fds_.clear();
  for (const auto& [id, peer] : peers_) {
    if (peer->state == PeerState::CONNECTED) hangup_fds_.push_back({peer->connection->fd(), POLLRDHUP, 0});
  }
  if (hangup_fds_.empty() || ::poll(hangup_fds_.data(), hangup_fds_.size(), 0) <= 0) return;
  // read_peers_locked takes what the peer sent before it went (notices included), then fails it.
  read_peers_locked();
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
  // The endpoint closes once no request of ours is outstanding on it (close_failed_endpoints_locked).
  // Force-closing it with a flush still pending can leave UCX 1.22 a callback that later runs on
  // the freed endpoint (ucp_ep_flush_resume_slow_path_callback: a crash seen under load); a dead
  // peer's requests end with an error as soon as the worker sees the connection go, so waiting
  // costs little, and a hung one's are force-ended after a short grace.
  peer.close_by = Clock::now() + std::min(ucx_seconds_to_ms(options_.timeout_s), kCloseGrace);
  peer.connection.reset();  // the peer's reader sees the close at once
  close_failed_endpoints_locked();
  changed_.notify_all();
}

void UcxTransfer::close_failed_endpoints_locked() {
  const SteadyTime now = Clock::now();
  for (auto& [id, peer] : peers_) {
    if (peer->state != PeerState::FAILED || peer->ep == nullptr) continue;
    const bool busy = std::any_of(transfers_.begin(), transfers_.end(), [&](const auto& entry) {
      return entry.second->peer == id && entry.second->outstanding > 0;
    });
    if (!busy || now >= peer->close_by) close_endpoint_locked(*peer);
  }
}

void UcxTransfer::close_endpoint_locked(Peer& peer) {
  unmap_peer_locked(peer);
  if (peer.ep == nullptr) return;
  for (ucp_rkey_h rkey : peer.rkeys) ucp_rkey_destroy(rkey);
  peer.rkeys.clear();
  // FORCE: no flush with a peer that may be dead; outstanding requests complete with an error.
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t request = ucp_ep_close_nbx(peer.ep, &param);
  if (UCS_PTR_IS_PTR(request)) {
    const SteadyTime deadline = Clock::now() + ucx_seconds_to_ms(options_.timeout_s);
    while (ucp_request_check_status(request) == UCS_INPROGRESS && Clock::now() < deadline) {
      ucp_worker_progress(ucx_.worker());
    }
    ucp_request_free(request);
  }
  peer.ep = nullptr;
}

void UcxTransfer::on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<Peer*>(arg)->endpoint_status = status;
}

}  // namespace rtpllm
