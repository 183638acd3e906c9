"""One decode step written over the model's own weights, for Llama-style decoders.

transformers' forward pays per-operation overhead that a decode step (one token per row) cannot
hide on a CPU, and its CPU attention kernel is slow for one query in bf16: on SmolLM2-135M with
30 rows and 200 tokens of context (1 thread), the bf16 step spent 186 ms in attention against
81 ms in all the matmuls, which is why transformers barely gains from bf16 (measured). This step
does the same arithmetic in fewer, larger operations: q, k and v come from one fused matmul, gate
and up from another, RoPE is one table lookup for q and k together, and attention is plain
matmuls over the KV cache's shared prompts (kv_cache.py): the queries of all rows of a request
multiply its prompt's keys at once, a matrix product instead of n vector products. On a CPU every
weight is reordered once into oneDNN's blocked layout (PackedLinear); F.linear starts from the plain layout.

Supported: transformers' LlamaForCausalLM (SmolLM2, Llama) without dynamic RoPE scaling. The
prefill still runs through transformers (one long forward pass per request).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ilf.errors import FailedPrecondition
from ilf.modeling import cpu_flags

from .kv_cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama",)


def check_supported(model) -> None:
    """Raises FailedPrecondition for a model this decode step cannot run."""
    config = model.config
    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    activation = getattr(config, "hidden_act", None)
    if config.model_type not in SUPPORTED_MODEL_TYPES or activation != "silu" or rope_type == "dynamic" \
            or getattr(config, "pretraining_tp", 1) != 1:
        raise FailedPrecondition(f"the generation engine decodes Llama-style models ({SUPPORTED_MODEL_TYPES}, "
                                 f"SiLU, no dynamic RoPE); this one is {config.model_type!r} with "
                                 f"{activation!r} and RoPE {rope_type!r}")


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear layers on the same input; the layers keep views into it, so
    the model's own forward (the prefill) uses the same memory."""
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[offset:offset + rows], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[offset:offset + rows], requires_grad=False)
        offset += rows
    return weight, bias


# The row count oneDNN picks its weight layout for; any count runs, with the same results.
PACKED_FOR_ROWS = 32
# oneDNN reorders bf16 weights only with either set (its error otherwise); AVX2-only CPUs keep F.linear for bf16.
ONEDNN_BF16_FLAG_SETS = ({"avx512bw", "avx512vl", "avx512dq"}, {"avx_ne_convert"})


def packs(weight: torch.Tensor) -> bool:
    """Whether PackedLinear can hold this weight in oneDNN's layout here."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return any(flags <= cpu_flags() for flags in ONEDNN_BF16_FLAG_SETS)
    return weight.dtype == torch.float32


class PackedLinear:
    """x @ weight.T + bias. On a CPU with oneDNN, for float32 and bfloat16, the weight is reordered once into
    oneDNN's blocked layout (as inductor and IPEX do; a copy next to the model's own, which the prefill uses), where
    F.linear starts from the plain layout at every call. Measured 2026-12-03 on 1 thread, 30 rows, bf16: 576 ->
    3,072 in 513 instead of 652 us, the 49,152-token output layer in 10.8 instead of 18.4 ms, identical results
    (float32: the last bits differ, another summation order); a whole decode step 1.35-1.45x faster in both dtypes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.packed = packs(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS) if self.packed \
            else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class _Layer:
    def __init__(self, layer):
        attention, mlp = layer.self_attn, layer.mlp
        self.qkv = PackedLinear(*_fuse(attention.q_proj, attention.k_proj, attention.v_proj))
        self.o = PackedLinear(attention.o_proj.weight, attention.o_proj.bias)
        self.gate_up = PackedLinear(*_fuse(mlp.gate_proj, mlp.up_proj))
        self.down = PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias)
        self.input_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.intermediate = mlp.gate_proj.weight.shape[0]


class Decoder:
    """The decode step of one loaded model."""

    def __init__(self, model):
        check_supported(model)
        config, inner = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed, self.norm, self.lm_head = inner.embed_tokens.weight, inner.norm.weight, PackedLinear(model.lm_head.weight)
        self.layers = [_Layer(layer) for layer in inner.layers]
        # RoPE as transformers computes it (float32, then the model's dtype), for every position at once
        positions = torch.arange(config.max_position_embeddings, device=self.embed.device)[None]
        cos, sin = inner.rotary_emb(self.embed[:1], positions)
        self.cos, self.sin = cos[0], sin[0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [rows, vocab] (float32) after feeding each row its token at its position."""
        rows, heads, kv_heads, head_dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        rotated = (heads + kv_heads) * head_dim
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        groups, mask = cache.groups(), cache.generated_mask(self.embed.dtype)
        hidden = F.embedding(tokens, self.embed)
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, (self.hidden,), layer.input_norm, self.eps)
            qkv = layer.qkv(x)
            qk = qkv[:, :rotated].view(rows, heads + kv_heads, head_dim)
            half = head_dim // 2
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
            cache.append(index, qk[:, heads:], qkv[:, rotated:].view(rows, kv_heads, head_dim))
            attended = self._attention(qk[:, :heads], cache, index, groups, mask)
            hidden = hidden + layer.o(attended)
            x = F.rms_norm(hidden, (self.hidden,), layer.post_norm, self.eps)
            gate_up = layer.gate_up(x)
            activated = F.silu(gate_up[:, :layer.intermediate]) * gate_up[:, layer.intermediate:]
            hidden = hidden + layer.down(activated)
        cache.commit()
        hidden = F.rms_norm(hidden, (self.hidden,), self.norm, self.eps)
        return self.lm_head(hidden).float()

    def _attention(self, queries: torch.Tensor, cache: KVCache, layer: int, groups, mask) -> torch.Tensor:
        """Each row attends to its request's prompt and to its own generated tokens; [rows, heads x head_dim]."""
        rows, kv_heads, head_dim = queries.shape[0], self.kv_heads, self.head_dim
        per_kv = self.heads // kv_heads       # query heads sharing one KV head, as transformers' repeat_kv groups them
        q = (queries * self.scale).view(rows, kv_heads, per_kv, head_dim)
        own_keys, own_values = cache.generated(layer)
        own_scores = q @ own_keys                                             # [rows, kv, per_kv, columns]
        if mask is not None:
            own_scores = own_scores + mask
        out = torch.empty_like(q)
        for prompt, begin, end in groups:
            n, length = end - begin, prompt.length
            # all n rows' queries against the one prompt: [kv, n x per_kv, head_dim] @ [kv, head_dim, length]
            grouped = q[begin:end].permute(1, 0, 2, 3).reshape(kv_heads, n * per_kv, head_dim)
            prompt_scores = (grouped @ prompt.keys[layer].transpose(-1, -2)).view(kv_heads, n, per_kv, length)
            scores = torch.cat([prompt_scores, own_scores[begin:end].permute(1, 0, 2, 3)], dim=-1)
            weights = torch.softmax(scores, dim=-1)   # accumulates in float32 for bf16 too
            from_prompt = weights[..., :length].reshape(kv_heads, n * per_kv, length) @ prompt.values[layer]
            from_own = weights[..., length:].permute(1, 0, 2, 3) @ own_values[begin:end]
            out[begin:end] = from_prompt.view(kv_heads, n, per_kv, head_dim).permute(1, 0, 2, 3) + from_own
        return out.view(rows, self.heads * head_dim)


_decoders: "weakref.WeakKeyDictionary[torch.nn.Module, Decoder]" = weakref.WeakKeyDictionary()


def decoder_for(model) -> Decoder:
    """The model's decoder, built once per model object."""
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = Decoder(model)
    return decoder
