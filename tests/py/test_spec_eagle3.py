"""EAGLE-3 heads: the checkpoint layout vLLM/SGLang load, drafts that match a from-scratch reference
of the head, and greedy output token-exact with the target alone (tiny random checkpoints)."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import checkpoint_path, load_hf_reference
from rtpllm import LLM, SamplingParams
from rtpllm.tools.eagle3_checkpoint import write_eagle3_checkpoint

TARGET = "llama3"  # 2 layers, hidden 128, vocab 512
AUX = [0, 1, 1]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def target():
    return checkpoint_path(TARGET)


@pytest.fixture(scope="module")
def head(target, tmp_path_factory):
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    return write_eagle3_checkpoint(str(tmp_path_factory.mktemp("eagle3")), config, draft_vocab_size=128,
                                   aux_layer_ids=AUX, intermediate_size=96, std=0.15, seed=3)


def eagle(head, k=3):
    return dict(method="eagle3", model=head, num_speculative_tokens=k, adaptive=False)


def prompts(seed=0, lengths=(5, 17, 40, 71)):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta, head_dim):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None].double() * inv[None]
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    a, b = x[..., :head_dim // 2], x[..., head_dim // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@torch.inference_mode()
def reference_first_draft_logits(target, head, known):
    """The head's logits for the token after `known`, from transformers' hidden states and the raw
    checkpoint tensors: row i reads (fc(target features at i), embedding of token i + 1)."""
    hf = load_hf_reference(target)
    cfg = json.load(open(os.path.join(head, "config.json")))
    w = load_file(os.path.join(head, "model.safetensors"))
    states = hf(torch.tensor([known]), output_hidden_states=True).hidden_states
    n = len(known)
    feats = torch.cat([states[a][0, :n - 1] for a in AUX], dim=-1) @ w["fc.weight"].T
    embeds = hf.model.embed_tokens(torch.tensor(known[1:]))
    eps, hd = cfg["rms_norm_eps"], cfg["head_dim"]
    x = torch.cat([rms(embeds, w["midlayer.input_layernorm.weight"], eps),
                   rms(feats, w["midlayer.hidden_norm.weight"], eps)], dim=-1)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    pos = torch.arange(n - 1)
    q = rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(n - 1, heads, hd), pos, cfg["rope_theta"], hd)
    k = rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(n - 1, kv_heads, hd), pos, cfg["rope_theta"], hd)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n - 1, kv_heads, hd)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    attn = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            is_causal=True).transpose(0, 1).reshape(n - 1, -1)
    h = attn @ w["midlayer.self_attn.o_proj.weight"].T + feats  # residual: the feature (norm after residual)
    m = rms(h, w["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)
           ) @ w["midlayer.mlp.down_proj.weight"].T
    out = rms(mlp + h, w["norm.weight"], eps)[-1]
    draft_logits = out @ w["lm_head.weight"].T
    full = torch.full((hf.config.vocab_size,), float("-inf"))
    full[torch.arange(draft_logits.shape[0]) + w["d2t"]] = draft_logits
    return full


def test_first_draft_matches_a_reference_of_the_head(target, head):
    llm = LLM(model=target, num_blocks=64, block_size=16, speculative_config=eagle(head, k=1))
    engine = llm.engine
    seen = []
    original = engine.spec.proposer.head.compute_logits
    engine.spec.proposer.head.compute_logits = lambda h: seen.append(original(h)) or seen[-1]
    prompt = prompts(1, (23,))[0]
    engine.add_request("a", prompt, GREEDY, stream=False)
    engine.step()  # prefill: the target writes its features; one token sampled
    engine.step()  # the first speculative step drafts one token
    first = engine.scheduler.get_request(engine._groups["a"].seqs[0].seq_id).token_ids[:len(prompt) + 1]
    want = reference_first_draft_logits(target, head, list(first))
    got = seen[0][0]
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))  # d2t maps onto the same target ids
    assert torch.allclose(got[finite], want[finite], atol=1e-3, rtol=1e-3)


def test_greedy_is_token_exact_in_every_situation(target, head):
    ps = prompts(2) + [prompts(3, (30,))[0] * 2]
    want = tokens(LLM(model=target, num_blocks=128, block_size=16).generate(ps, GREEDY))
    llm = LLM(model=target, num_blocks=128, block_size=16, speculative_config=eagle(head))
    assert tokens(llm.generate(ps, GREEDY)) == want
    assert tokens(llm.generate(ps[-1:], GREEDY)) == want[-1:]  # a prefix-cache hit
    assert llm.engine.stats().prefix_cache_hits > 0
    assert llm.engine.stats().spec.num_draft_tokens > 0
    assert llm.engine.check_kv_pool_free()
    small = LLM(model=target, num_blocks=12, block_size=16, max_num_batched_tokens=40, speculative_config=eagle(head))
    assert tokens(small.generate(ps, GREEDY)) == want
    assert small.engine.stats().num_preemptions > 0
    assert small.engine.check_kv_pool_free()


def test_penalised_greedy_is_token_exact(target, head):
    """The head's own steps see the penalised view (history + its earlier drafts), the verifier
    penalises every row with the drafts before it: the output equals decoding without speculation."""
    ps = prompts(4)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, **p) for p in (
        dict(repetition_penalty=0.5), dict(presence_penalty=-2.0, frequency_penalty=-1.0), {},
        dict(repetition_penalty=1.3, frequency_penalty=0.6))]
    want = tokens(LLM(model=target, num_blocks=128, block_size=16).generate(ps, params))
    llm = LLM(model=target, num_blocks=128, block_size=16, speculative_config=eagle(head, k=4))
    assert tokens(llm.generate(ps, params)) == want
    assert llm.engine.stats().spec.num_draft_tokens > 0
    assert llm.engine.check_kv_pool_free()


def test_bad_heads_fail_at_start(target, head, tmp_path):
    config = json.load(open(os.path.join(head, "config.json")))
    bad = tmp_path / "vocab"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="speculative_config.model"):
        LLM(model=target, num_blocks=32, speculative_config=eagle(str(bad)))
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "config.json").write_text(json.dumps(config))
    weights = load_file(os.path.join(head, "model.safetensors"))
    del weights["fc.weight"]
    from safetensors.torch import save_file
    save_file(weights, str(torn / "model.safetensors"))
    with pytest.raises(ValueError, match="fc.weight"):
        LLM(model=target, num_blocks=32, speculative_config=eagle(str(torn)))
    layers = tmp_path / "layers"
    layers.mkdir()
    (layers / "config.json").write_text(json.dumps({**config, "eagle_aux_hidden_state_layer_ids": [0, 1, 5]}))
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
        LLM(model=target, num_blocks=32, speculative_config=eagle(str(layers)))
