// Moves KV blocks between processes: prefill -> decode (push, layer by layer) and the shared remote
// store (get and put of whole blocks). One engine per process; it owns no KV memory, it registers
// memory the caller owns (a KVLayout: the paged GPU pool, or a host region of whole blocks, see
// transfer_plan.h make_block_major_layout) and moves bytes between its own and a peer's registration.
//
// Life of a connection:
//   A: register_kv(layout)              B: register_kv(layout); listen_port() -> port
//   A: connect("127.0.0.1", port) -> peer id (both sides exchange a PeerDescriptor: worker address,
//      remote keys, layout, identity; identities and KV shapes must agree, block sizes may differ)
//   A: put(peer, {request_id, local blocks, remote blocks, num_tokens, layer}) -> handle
//   A: poll(handle) until DONE / FAILED;  B: take_notices() yields {peer, request_id, layer, blocks}
//      once the bytes are in B's memory, and those of every earlier put from A. A put is DONE once
//      its bytes are in B's memory (remote completion, either DataPath).
//
// Contract on failure (the rule that no caller ever hangs):
//   - every wait has a deadline (TransferOptions::timeout_s): connect() throws; a transfer still
//     unfinished after timeout_s fails, and with it its peer (bytes already on the wire cannot be
//     recalled, only the connection can be closed); a peer that sent nothing (heartbeats
//     included) for timeout_s is FAILED;
//   - a peer that closes or dies is FAILED within the timeout; all its transfers end FAILED and
//     later calls naming it throw std::runtime_error;
//   - a transfer is reported final only when the engine no longer touches the local blocks it
//     names, so after DONE or FAILED the caller may free or reuse them;
//   - bad input (unknown peer, block ids out of range, block lists that do not cover num_tokens,
//     incompatible layouts, too many blocks) throws std::invalid_argument naming the field and
//     changes no state.
//
// Write grants (TransferOptions::require_write_grants): a receiver whose block lists reach its
// writers through a third party (decode's reservation, carried by the router) does not let a wrong
// or stale list land in another request's blocks. It grants each request id the blocks reserved
// for it (grant_writes) and revokes the grant when the request ends (revoke_writes). A writer puts
// to such a peer only after asking it (one round trip on the control channel per put): a put whose
// request id holds no grant, or that names a remote block outside it, fails with an error that
// says "write grant", and nothing is written.
// All methods are thread safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/core/types.h"
#include "rtpllm/kvstore/kv_connector.h"
#include "rtpllm/kvstore/kv_layout.h"

namespace rtpllm {

using PeerId = uint64_t;  // local to one engine; 0 is never a valid peer

// How a put's or get's bytes travel to a peer.
//   RMA:      one-sided ucp_put/ucp_get into the peer's registered memory; the peer's CPU takes no
//             part where the transport does RMA in hardware (InfiniBand/RoCE, CUDA IPC, CMA).
//   MESSAGES: active messages that the peer's engine copies into its memory. Where a transport has
//             no RMA (TCP), UCX emulates RMA with messages the target answers from inside its
//             progress loop, and UCX 1.22 aborts the target process when such an answer meets a
//             peer that just died; with MESSAGES the target never answers inside UCX (its
//             acknowledgements go over the control channel), so a dying peer is only an error.
//   DIRECT:   this engine maps the peer's registered memory into its own address space and copies
//             the bytes itself (peer_memory.h: CUDA IPC and one copy kernel per put between two
//             GPU processes of one host), then sends the notice on the control channel. Needs a
//             PeerMemory on both sides with the same scope; forced, a peer without one is refused.
//   AUTO:     DIRECT to peers this engine connected to where both engines can (same host, memory the
//             PeerMemory supports; an accepted peer is not mapped: writers connect), else RMA
//             where the endpoint to the peer has a transport with RMA in hardware, else MESSAGES.
enum class DataPath : uint8_t { AUTO, RMA, MESSAGES, DIRECT };

struct TransferOptions {
  std::string name = "rtpllm";        // shown to peers (PeerInfo::name)
  std::string identity;               // cache identity (model, dtype, ...): peers must present the same
  std::string listen_host = "127.0.0.1";
  int32_t listen_port = 0;            // 0: any free port (see listen_port())
  double timeout_s = 10.0;            // bound on every wait: connect, one transfer, peer silence
  int32_t max_blocks_per_transfer = 1 << 16;
  bool require_write_grants = false;  // peers' puts need a grant (grant_writes) for their request id
  DataPath data_path = DataPath::AUTO;  // how this engine's puts and gets move bytes (peers choose their own)

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

// One put or get: tokens [0, num_tokens) held by local_blocks (block_size of the local layout each)
// move to or from the tokens [0, num_tokens) held by remote_blocks (the peer's block size).
struct TransferRequest {
  uint64_t request_id = 0;            // the caller's id, echoed in the peer's notice
  std::vector<BlockId> local_blocks;
  std::vector<BlockId> remote_blocks;
  int64_t num_tokens = -1;            // -1: every token of local_blocks
  int32_t layer = -1;                 // -1: every layer; otherwise only this layer (layer-by-layer push)
  bool notify = true;                 // put only: send the peer a TransferNotice once the data landed
  std::string payload = {};           // put with notify only: echoed in the notice (<= kMaxNoticePayloadBytes),
                                      // e.g. prefill's first sampled token with its last layer
  // Only KV heads [local_head_offset, + num_heads) of each local token move, to heads
  // [remote_head_offset, + num_heads) of the remote token: tensor parallelism with different sizes
  // on the two sides, where a rank holds a contiguous range of the heads. -1: every head (the two
  // layouts then hold as many). A slice moves one copy per token and plane (transfer_plan.h).
  int32_t num_heads = -1;
  int32_t local_head_offset = 0;
  int32_t remote_head_offset = 0;
};

inline constexpr size_t kMaxNoticePayloadBytes = 4096;

struct TransferStatus {
  TransferState state = TransferState::PENDING;
  std::string error;                  // why it FAILED
};

// Received by the engine a put wrote into, after the bytes are in its memory.
struct TransferNotice {
  PeerId peer = 0;
  uint64_t request_id = 0;
  int32_t layer = -1;                 // -1: every layer
  std::vector<BlockId> blocks;        // the receiver's blocks (the put's remote_blocks)
  int64_t num_tokens = 0;
  std::string payload;                // the put's TransferRequest::payload
};

enum class PeerState : uint8_t {
  CONNECTED,
  FAILED,  // closed, died or went silent; see PeerInfo::error
};

struct PeerInfo {
  PeerId id = 0;
  std::string name;
  PeerState state = PeerState::CONNECTED;
  std::string error;
  KVLayout layout;                    // the peer's layout (its addresses are meaningless here)
  DataPath data_path = DataPath::RMA; // how this engine's puts and gets to the peer move bytes (never AUTO)
};

struct TransferStats {
  uint64_t puts = 0;                  // put() calls finished DONE
  uint64_t gets = 0;
  uint64_t failed = 0;                // transfers finished FAILED
  uint64_t bytes_put = 0;
  uint64_t bytes_got = 0;
  uint64_t notices_received = 0;
  uint64_t peers_failed = 0;
};

class KVTransfer {
 public:
  virtual ~KVTransfer() = default;

  // Registers the memory this engine exposes; once, before connect() or accepting peers.
  virtual void register_kv(const KVLayout& layout) = 0;

  // The port peers connect() to.
  virtual int32_t listen_port() const = 0;

  // Connects to an engine listening at host:port and exchanges descriptors. Blocks at most
  // timeout_s; throws std::runtime_error (unreachable, refused: different identity or KV shape).
  virtual PeerId connect(const std::string& host, int32_t port) = 0;

  // Peers known to this engine, both those it connected to and those that connected to it.
  virtual std::vector<PeerInfo> peers() const = 0;

  // Closes the connection; the peer sees it FAILED ("closed by peer"). Unknown ids are ignored.
  virtual void disconnect(PeerId peer) = 0;

  // One-sided: writes local blocks into the peer's blocks / reads the peer's blocks into local
  // ones. Never blocks on the network; poll() the handle.
  virtual TransferHandle put(PeerId peer, const TransferRequest& request) = 0;
  virtual TransferHandle get(PeerId peer, const TransferRequest& request) = 0;

  // PENDING or the final status; a final status is reported once, then the handle is forgotten
  // (polling it again, or an unknown handle, throws std::invalid_argument).
  virtual TransferStatus poll(TransferHandle handle) = 0;

  // Blocks until the handle is final or timeout_s passed (then returns PENDING); same reporting
  // rule as poll().
  virtual TransferStatus wait(TransferHandle handle, double timeout_s) = 0;

  // Notices received since the last call, in arrival order; waits up to wait_s for the first one
  // when there are none (0: never waits).
  virtual std::vector<TransferNotice> take_notices(double wait_s) = 0;

  // A file descriptor that is readable while notices wait to be taken (take_notices makes it
  // unreadable again), so that a caller can wait for notices and its own sockets in one
  // poll/select; -1 where the engine has none. Owned by the engine.
  virtual int notice_fd() const = 0;

  virtual TransferStats stats() const = 0;

  // Receiver side of write grants: puts naming request_id may write `blocks` (replaces an earlier
  // grant of the same id) / no longer may (unknown ids are ignored). Puts already issued are not
  // recalled: keep the blocks until their writes are final.
  virtual void grant_writes(uint64_t request_id, const std::vector<BlockId>& blocks) = 0;
  virtual void revoke_writes(uint64_t request_id) = 0;
};

}  // namespace rtpllm
