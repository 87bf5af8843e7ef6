// UcxTransfer's write grants (kv_transfer.h): the receiver's table and its answers to queries, and
// the writer's check of each put against the answer before it is issued.
#include <algorithm>
#include <stdexcept>
#include <unordered_set>

#include "rtpllm/transfer/ucx/ucx_transfer_state.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

void UcxTransfer::grant_writes(uint64_t request_id, const std::vector<BlockId>& blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (BlockId b : blocks) {
    if (b < 0 || (registration_ && b >= layout_.num_blocks)) {
      throw std::invalid_argument("blocks: block id " + std::to_string(b) + " is out of range");
    }
  }
  write_grants_[request_id] = blocks;
}

void UcxTransfer::revoke_writes(uint64_t request_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  write_grants_.erase(request_id);
}

void UcxTransfer::answer_grant_query_locked(Peer& peer, const std::string& payload, std::string* error) {
  GrantMessage answer;
  try {
    answer.request_id = decode_grant_query(payload);
  } catch (const std::runtime_error& e) {
    *error = std::string("malformed write grant query: ") + e.what();
    return;
  }
  const auto it = write_grants_.find(answer.request_id);
  if (it != write_grants_.end()) {
    answer.granted = true;
    answer.blocks = it->second;
  }
  if (peer.connection->send(MessageType::GRANT, encode_grant(answer),
                            Clock::now() + ucx_seconds_to_ms(options_.timeout_s), error)) {
    peer.last_sent = Clock::now();
  }
}

void UcxTransfer::on_grant_locked(Peer& peer, const std::string& payload) {
  GrantMessage grant = decode_grant(payload);
  if (peer.grant_queries.erase(grant.request_id) == 0) {
    throw std::runtime_error("an answer to no query (request id " + std::to_string(grant.request_id) + ")");
  }
  const uint64_t id = grant.request_id;
  peer.grant_answers[id] = std::move(grant);
}

bool UcxTransfer::granted_locked(Transfer& transfer) {
  if (!transfer.is_put || transfer.granted) return true;
  Peer& peer = *peers_.at(transfer.peer);
  if (peer.state != PeerState::CONNECTED || !peer.remote.requires_write_grants) return true;  // issue_locked reports a failed peer
  const uint64_t request_id = transfer.notice.request_id;
  auto fail = [&](std::string why) {
    transfer.error = std::move(why);
    transfer.phase = Transfer::Phase::ISSUED;  // nothing outstanding: finish_transfers_locked makes it final
    return false;
  };
  const auto answer = peer.grant_answers.find(request_id);
  if (answer == peer.grant_answers.end()) {
    if (Clock::now() > transfer.deadline) {
      return fail("peer '" + peer.remote.name + "' did not answer a write grant query within " +
                  std::to_string(options_.timeout_s) + " s");
    }
    if (peer.grant_queries.insert(request_id).second) {
      std::string error;
      if (!peer.connection->send(MessageType::GRANT_QUERY, encode_grant_query(request_id),
                                 Clock::now() + ucx_seconds_to_ms(options_.timeout_s), &error)) {
        fail_peer_locked(peer, error);  // fails this transfer too
        transfer.phase = Transfer::Phase::ISSUED;
        return false;
      }
      peer.last_sent = Clock::now();
    }
    return false;
  }
  if (!answer->second.granted) {
    return fail("remote_blocks: peer '" + peer.remote.name + "' holds no write grant for request " +
                std::to_string(request_id) + " (never reserved there, or ended)");
  }
  const std::unordered_set<BlockId> allowed(answer->second.blocks.begin(), answer->second.blocks.end());
  for (BlockId b : transfer.notice.blocks) {
    if (allowed.count(b) == 0) {
      return fail("remote_blocks: block " + std::to_string(b) + " is outside the write grant of request " +
                  std::to_string(request_id) + " on peer '" + peer.remote.name + "'");
    }
  }
  transfer.granted = true;
  return true;
}

}  // namespace rtpllm
