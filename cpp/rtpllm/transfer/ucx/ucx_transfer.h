// KVTransfer over UCX (UCP), on one of three data paths per peer (kv_transfer.h DataPath):
//   RMA:      puts and gets are ucp_put_nbx / ucp_get_nbx on the peer's registered memory; a put is
//             flushed (ucp_ep_flush_nbx: remote completion) before it is DONE and before its NOTICE
//             goes out on the control channel, so the receiver never sees a notice before the bytes.
//   DIRECT:   (ucx_transfer_direct.cc) the peer's regions are mapped here at the handshake
//             (PeerMemory); a put or get is one PeerMemory::copy, and a put's NOTICE goes out on
//             the control channel once the copy finished.
//   MESSAGES: (ucx_transfer_messages.cc) a put is numbered active messages that the receiver copies
//             into its memory, then a PUT_DONE message carrying the notice; the receiver delivers
//             the notice and acknowledges on the control channel (PUT_ACK) once that put and every
//             earlier one landed, and the put is DONE at the acknowledgement. A get is request
//             messages that the target answers with data messages after its progress call.
//
// Threads: one progress thread per engine drives ucp_worker_progress, the control sockets
// (accept, handshakes, notices, heartbeats) and every deadline; it sleeps on the worker's event fd
// and the sockets when nothing is in flight, spins while transfers move, and naps 1 ms at a time
// while they are stalled. Callers' threads only validate, plan and queue. One mutex guards all
// state and every UCX call.
#pragma once

#include <poll.h>

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "rtpllm/transfer/control_channel.h"
#include "rtpllm/transfer/kv_transfer.h"
#include "rtpllm/transfer/peer_memory.h"
#include "rtpllm/transfer/transfer_plan.h"
#include "rtpllm/transfer/ucx/ucx_memory.h"

namespace rtpllm {

struct IncomingPut;  // ucx_transfer_state.h
namespace ucx_wire {
struct ScatterEntry;  // ucx_message_wire.h
}

class UcxTransfer final : public KVTransfer {
 public:
  // Starts listening and the progress thread. thread_init runs first on the progress thread
  // (the CUDA build makes the KV pool's device current there: UCX's CUDA transports need it).
  // peer_memory: DataPath::DIRECT's access to peers' memory (none: never DIRECT).
  explicit UcxTransfer(TransferOptions options, std::function<void()> thread_init = {},
                       std::shared_ptr<PeerMemory> peer_memory = nullptr);
  ~UcxTransfer() override;  // closes every peer (they see "closed by peer"), fails what is in flight

  void register_kv(const KVLayout& layout) override;
  int32_t listen_port() const override;
  PeerId connect(const std::string& host, int32_t port) override;
  std::vector<PeerInfo> peers() const override;
  void disconnect(PeerId peer) override;
  TransferHandle put(PeerId peer, const TransferRequest& request) override;
  TransferHandle get(PeerId peer, const TransferRequest& request) override;
  TransferStatus poll(TransferHandle handle) override;
  TransferStatus wait(TransferHandle handle, double timeout_s) override;
  std::vector<TransferNotice> take_notices(double wait_s) override;
  int notice_fd() const override { return notice_fd_; }
  TransferStats stats() const override;
  void grant_writes(uint64_t request_id, const std::vector<BlockId>& blocks) override;
  void revoke_writes(uint64_t request_id) override;

 private:
  struct Peer;
  struct Transfer;

  // Checked descriptor of the remote side, or a reason to refuse it.
  std::string refusal_reason(const PeerDescriptor& remote) const;
  // `connected`: this engine dialled the peer (the writer, in PD and the KV store), else accepted it.
  PeerId add_peer_locked(ControlConnection connection, PeerDescriptor remote, bool connected);
  TransferHandle submit(PeerId peer, const TransferRequest& request, bool is_put);

  // Progress thread.
  void run(std::function<void()> thread_init);
  void progress_once_locked();
  void accept_and_handshake_locked();
  void read_peers_locked();
  // Fails every peer whose control connection hung up; runs before each ucp_worker_progress call.
  void fail_hung_up_peers_locked();
  void issue_locked(Transfer& transfer);
  // DataPath::DIRECT (ucx_transfer_direct.cc).
  std::string direct_obstacle(const PeerDescriptor& remote) const;  // why not DIRECT to it ("": none)
  bool map_peer_locked(Peer& peer, std::string* why);                // its regions mapped here, or why not
  void unmap_peer_locked(Peer& peer);                                // after every copy ended
  void issue_direct_locked(Transfer& transfer, Peer& peer);
  bool direct_copy_ended_locked(Transfer& transfer);                 // its copy finished (or failed)
  // DataPath::MESSAGES (ucx_transfer_messages.cc).
  void register_message_handlers();
  DataPath data_path_for(ucp_ep_h ep) const;
  void issue_as_messages_locked(Transfer& transfer, Peer& peer);
  static ucp_request_param_t message_param(Transfer& transfer, ucs_memory_type_t memory);
  bool send_put_data_locked(Transfer& transfer, Peer& peer);       // PUT_DATA and PUT_SCATTER messages
  bool send_get_requests_locked(Transfer& transfer, Peer& peer);   // as many as the window allows
  void continue_gets_locked();  // the requests of gets the window held back
  bool landed_locked(const Transfer& transfer, const Peer& peer) const;  // a transfer's bytes are where they go
  void answer_peers_locked();  // PUT_ACKs and get replies owed since the last progress call
  Peer* peer_by_key_locked(uint64_t key);
  bool registered_locked(uint64_t address, uint64_t bytes) const;  // inside this engine's registration
  // Copies a message's data to address in this engine's registered memory; false outside it.
  bool land_locked(void* data, uint64_t address, size_t bytes, const ucp_am_recv_param_t* param);
  // Likewise for a PUT_SCATTER message's pieces (every one must be inside it).
  bool land_scatter_locked(void* data, const ucx_wire::ScatterEntry* entries, size_t count,
                           const ucp_am_recv_param_t* param);
  // The peer's put `sequence` in progress (new if need be), or nullptr with the peer's protocol
  // error set: a put already complete, or too many in progress.
  IncomingPut* incoming_put_locked(Peer& peer, uint64_t sequence);
  void complete_puts_locked(Peer& peer);  // delivers the notices of puts landed in order
  // Counts `length` bytes of the peer's put `sequence` once `land` copied them into place; sets the
  // peer's protocol error instead when the put announced fewer, or `land` refused (outside memory).
  void receive_put_bytes_locked(Peer& peer, IncomingPut& put, uint64_t sequence, size_t length,
                                const std::function<bool()>& land);
  void push_notice_locked(const Peer& peer, NoticeMessage notice);
  ucs_status_t on_put_data_locked(const void* header, size_t header_length, void* data, size_t length,
                                  const ucp_am_recv_param_t* param);
  ucs_status_t on_put_scatter_locked(const void* header, size_t header_length, void* data, size_t length,
                                     const ucp_am_recv_param_t* param);
  ucs_status_t on_put_done_locked(const void* header, size_t header_length, void* data, size_t length,
                                  const ucp_am_recv_param_t* param);
  ucs_status_t on_get_request_locked(const void* header, size_t header_length);
  ucs_status_t on_get_reply_locked(const void* header, size_t header_length, void* data, size_t length,
                                   const ucp_am_recv_param_t* param);
  // Write grants (ucx_transfer_grants.cc): whether a queued put may be issued now (false: it waits
  // for the peer's answer, or failed, with its error set); the peer's query and answer.
  bool granted_locked(Transfer& transfer);
  void answer_grant_query_locked(Peer& peer, const std::string& payload, std::string* error);
  void on_grant_locked(Peer& peer, const std::string& payload);
  void finish_transfers_locked();
  void fail_peer_locked(Peer& peer, const std::string& reason);
  void close_endpoint_locked(Peer& peer);
  void close_failed_endpoints_locked();  // the endpoints of failed peers that may close now
  bool has_in_flight_locked() const;
  void wait_for_events();
  void wake();

  static void on_request_done(void* request, ucs_status_t status, void* user_data);
  static void on_reply_sent(void* request, ucs_status_t status, void* user_data);
  static void on_endpoint_error(void* arg, ucp_ep_h ep, ucs_status_t status);

  const TransferOptions options_;
  const std::chrono::milliseconds heartbeat_;
  const std::shared_ptr<PeerMemory> peer_memory_;
  UcxWorker ucx_;
  ControlListener listener_;
  int wake_fd_ = -1;
  int notice_fd_ = -1;  // eventfd: readable while notices_ is not empty

  mutable std::mutex mutex_;
  std::condition_variable changed_;  // a transfer finished or a notice arrived
  bool stopping_ = false;
  KVLayout layout_;
  std::unique_ptr<UcxRegistration> registration_;
  std::string descriptor_;  // this engine's encoded PeerDescriptor, once registered
  std::vector<std::pair<ControlConnection, SteadyTime>> handshakes_;  // accepted, no HELLO yet
  std::vector<pollfd> hangup_fds_;  // fail_hung_up_peers_locked's scratch: it runs per progress call
  std::map<PeerId, std::unique_ptr<Peer>> peers_;
  std::map<TransferHandle, std::unique_ptr<Transfer>> transfers_;
  std::vector<TransferNotice> notices_;
  std::map<uint64_t, std::vector<BlockId>> write_grants_;  // request id -> blocks peers may write
  TransferStats stats_;
  PeerId next_peer_ = 1;
  uint64_t key_state_;  // draws connection keys (splitmix64), seeded from std::random_device
  TransferHandle next_handle_ = 1;
  SteadyTime last_activity_;  // the worker last made progress, or a transfer was queued
  static constexpr std::chrono::milliseconds kSpinWindow{5};
  static constexpr std::chrono::milliseconds kCloseGrace{250};  // a failed peer's requests may end first
  std::thread thread_;
};

}  // namespace rtpllm
