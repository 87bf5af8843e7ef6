"""The shared remote KV store process (`rtpllm kvstore serve`); its data path is C++
(cpp/rtpllm/kvstore/remote)."""
