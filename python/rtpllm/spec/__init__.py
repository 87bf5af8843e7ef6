"""Speculative decoding: proposers (n-gram, draft model, EAGLE-3) behind one interface, lossless
verification (greedy and rejection sampling), and the adaptive choice of how many drafts to verify.

The C++ scheduler gives a decoding sequence k lookahead slots (`Scheduler.set_lookahead`); the
proposer fills them after scheduling, the target verifies k + 1 positions in one forward, and
`Scheduler.update` appends the accepted tokens and rolls back the rest (see
cpp/rtpllm/sched/speculation.h). `spec.decoder.SpeculativeDecoder` is what the engine calls.
"""
