// hash_block_tokens: the prefix-cache key, for tools and tiers that must agree with the runtime.
#include <pybind11/pybind11.h>

#include "rtpllm/cache/block_hash.h"
#include "token_ids_arg.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_block_hash(py::module_& m) {
  m.attr("ROOT_BLOCK_HASH") = kRootBlockHash;
  m.def(
      "hash_block_tokens",
      [](BlockHash parent_hash, py::handle token_ids, uint64_t extra_key) {
        const auto ids = token_ids_arg(token_ids, "token_ids");
        return hash_block_tokens(parent_hash, ids.data(), ids.size(), extra_key);
      },
      py::arg("parent_hash"), py::arg("token_ids"), py::arg("extra_key") = 0,
      "Stable 64-bit key of a full block: hash(parent block's key, the block's token ids, extra_key). "
      "The first block's parent is ROOT_BLOCK_HASH.");
}

}  // namespace rtpllm::bindings
