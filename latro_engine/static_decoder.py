"""Rollout decoding with a static KV cache and, on CUDA, the whole decode step in a CUDA graph.

Hugging Face's forward costs a few milliseconds of Python and kernel launches per token whatever
the batch, so a decode loop built on it is limited by the host, not the GPU. This module decodes
Llama-family models (``llama``, ``mistral``, ``qwen2``; ``qwen3`` with its RMSNorm of each query
and key head; ``phi3`` with its fused q/k/v and gate/up projections, taken as blocks of rows, and
its longrope embeddings: RMSNorm, rotary embeddings, grouped-query attention, SiLU-gated MLP)
with its own functional forward over the model's weights:

* the KV cache is preallocated ``[rows, kv heads, slots, head dim]`` per layer, the prompt in slots
  ``[0, P)`` and decode step t's input in slot ``P + t - 1``; a boolean slot mask replaces the
  growing attention mask, and :func:`latro_engine.ops.decode_attention` (one kernel per layer on
  CUDA) writes the new key and value and attends over the filled slots only;
* one decode step (forward, :func:`latro_engine.ops.sample` with device seed and offset, the
  incremental stop check, writing the token) touches only preallocated buffers and reads the
  step from a device scalar it increments itself, so on CUDA it is captured once into a CUDA
  graph and replayed with no host synchronization per token;
* finished rows stop costing work: every ``compact_every`` steps the loop reads how many rows
  are still live (its only host synchronization) and, once they fit a smaller row bucket (a
  multiple of 8), gathers them into the first rows of every buffer and replays that bucket's
  graph. Buckets are views of the same buffers, so graphs stay valid.

The weights are used in place when they already have the matmul dtype (the model's dtype, or the
autocast dtype when autocast is on); otherwise (float32 master weights under bfloat16 autocast,
or LoRA adapters, merged into their base weight) a copy is refreshed once per rollout instead of
casting every weight at every token. Residual stream, norms and rotary embeddings follow the
same dtypes as the model's own forward under the same autocast state.

A decoder, its buffers and graphs are kept per model between rollouts with the same shape and
sampling settings (training calls the rollout with the same settings every step); the
``KEPT_DECODERS`` most recently used are kept, sharing one set of weight copies, and
:func:`release_static_decoder` frees them. A call with more rows or a longer prompt than the
decoder of its settings holds replaces that decoder by one with the larger of each capacity.
:func:`static_decoder_unsupported` says why a model cannot use this path; the rollout then
falls back to the Hugging Face loop in :mod:`latro_engine.rollout`.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from latro_engine import ops
from latro_engine._extension import use_native
from latro_engine.reference import MAX_DECODE_HEAD_DIM

__all__ = ["StaticDecoder", "decode_static", "release_static_decoder", "static_decoder_unsupported"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init
ROW_BUCKET = 8  # rows are padded to a multiple of this; one CUDA graph per bucket in use
SLOT_BUCKET = 64  # KV slots are allocated in multiples of this (prompt lengths vary per call)
# Decoders kept per model, most recently used: training alternates rollouts with evaluation
# (greedy and sampled), each its own settings.
KEPT_DECODERS = 2

_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- model access
def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside DDP / peft wrappers."""
    model = _unwrap_ddp(model)
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected into the base model
        model = model.get_base_model()
    return model


def _rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def _rope_type(config) -> str:
    params = _rope_parameters(config)
    return str(params.get("rope_type", params.get("type", "default")))


def _rope_unsupported(config, total_length: int) -> str | None:
    rope = _rope_type(config)
    if rope == "longrope":
        # Hugging Face switches a whole forward to the long factors once a position reaches the
        # original context, and keeps the short ones (the buffer original_inv_freq) below it.
        original = _rope_parameters(config).get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if original is None:
            return "longrope without original_max_position_embeddings"
        if total_length > original:
            return (
                f"sequences of {total_length} tokens pass longrope's original context "
                f"{original} (its long factors)"
            )
    elif rope not in _STATIC_ROPE_TYPES:
        return f"rope type {rope!r} (supported: {_STATIC_ROPE_TYPES} and longrope)"
    partial = _rope_parameters(config).get("partial_rotary_factor")
    if partial is None:
        partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None and partial != 1.0:
        return "partial rotary embeddings"
    return None


def _attention_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.base_layer if _is_lora(module) else module


# A matmul of the decoder: the module holding its weight (None where missing), that module's
# path in the layer, and its rows of the weight (None: all).
_Matmul = tuple[torch.nn.Module | None, str, slice | None]


def _layer_matmuls(layer: torch.nn.Module, config) -> dict[str, _Matmul]:
    """A decoder layer's seven matmuls (q, k, v, o, gate, up, down). Where a model fuses some
    into one module (phi3: qkv_proj, gate_up_proj) each is its block of rows of that weight,
    a view: the same weight bytes read, and outputs that need no splitting copies."""
    attn, mlp = layer.self_attn, layer.mlp
    out: dict[str, _Matmul] = {}
    if hasattr(attn, "qkv_proj"):
        heads, kv_heads, dim = _attention_shape(config)
        q, kv = heads * dim, kv_heads * dim
        blocks = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
        for name, rows in blocks.items():
            out[name] = (attn.qkv_proj, "self_attn.qkv_proj", rows)
    else:
        for name in "qkv":
            out[name] = (getattr(attn, f"{name}_proj", None), f"self_attn.{name}_proj", None)
    out["o"] = (getattr(attn, "o_proj", None), "self_attn.o_proj", None)
    if hasattr(mlp, "gate_up_proj"):
        half = config.intermediate_size
        out["gate"] = (mlp.gate_up_proj, "mlp.gate_up_proj", slice(0, half))
        out["up"] = (mlp.gate_up_proj, "mlp.gate_up_proj", slice(half, 2 * half))
    else:
        for name in ("gate", "up"):
            out[name] = (getattr(mlp, f"{name}_proj", None), f"mlp.{name}_proj", None)
    out["down"] = (getattr(mlp, "down_proj", None), "mlp.down_proj", None)
    return out


def _is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _peft_unsupported(model: torch.nn.Module) -> str | None:
    """A peft model whose adapters are not LoRA (prompt or prefix tuning, p-tuning, AdaLoRA,
    ...): their forward is not the base layers' plus B @ A, which is all the decoder merges."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return None
    peft_type = str(getattr(config, "peft_type", ""))
    if peft_type.rsplit(".", 1)[-1].upper() != "LORA":
        return f"peft adapters of type {peft_type.rsplit('.', 1)[-1]} (only plain LoRA is merged)"
    return None


def _linear_unsupported(module: torch.nn.Module, name: str) -> str | None:
    if _is_lora(module):
        if getattr(module, "fan_in_fan_out", False):
            return f"{name}: LoRA with fan_in_fan_out"
        for adapter in module.active_adapters:
            if getattr(module, "use_dora", {}).get(adapter, False):
                return f"{name}: DoRA adapters"
            # peft's LoRA variants (DoRA, KaSA, aLoRA, ...) change the forward of B @ A
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None:
                return f"{name}: LoRA variant {type(variant).__name__}"
            if getattr(module, "lora_bias", {}).get(adapter, False):
                return f"{name}: LoRA bias"
            a = module.lora_A[adapter] if adapter in module.lora_A else None
            if not isinstance(a, torch.nn.Linear):  # AdaLoRA: bare parameters (and lora_E)
                return f"{name}: adapter {adapter!r} is not a LoRA linear adapter"
    if type(_base(module)) is not torch.nn.Linear:
        return f"{name} is a {type(_base(module)).__name__}, not a torch.nn.Linear"
    return None


def static_decoder_unsupported(model: torch.nn.Module, total_length: int = 0) -> str | None:
    """Why ``model`` cannot use the static decoder for sequences of ``total_length`` tokens
    (prompt + rationale), or None when it can."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()  # noqa: N806
    if isinstance(model, FSDPModule) or any(
        type(p).__name__ == "DTensor" for p in model.parameters()
    ):
        return "FSDP-sharded parameters"
    reason = _peft_unsupported(_unwrap_ddp(model))
    if reason:
        return reason
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if model.training and (
        getattr(config, "attention_dropout", 0.0)
        or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    ):
        return "the model is in train mode with dropout (the static decoder applies none)"
    body = getattr(inner, "model", None)
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model has no embed_tokens/layers/norm/rotary_emb"
    if type(body.embed_tokens) is not torch.nn.Embedding:
        return f"embed_tokens is a {type(body.embed_tokens).__name__}"
    head_dim = _attention_shape(config)[2]
    if head_dim > MAX_DECODE_HEAD_DIM:
        return f"head_dim {head_dim} (decode_attention takes up to {MAX_DECODE_HEAD_DIM})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    reason = _rope_unsupported(config, total_length)
    if reason:
        return reason
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "use_sliding_window", True)  # qwen2 has it off by default
    if window and sliding and total_length > window:
        return f"sequences of {total_length} tokens exceed the sliding window {window}"
    residual_dtype = body.embed_tokens.weight.dtype
    norms = [
        (f"layers.{i}.{part}", getattr(layer, part, None))
        for i, layer in enumerate(body.layers)
        for part in ("input_layernorm", "post_attention_layernorm")
    ]
    for name, norm in [*norms, ("norm", body.norm)]:
        if not hasattr(norm, "variance_epsilon") or not hasattr(norm, "weight"):
            return f"{name} is not an RMSNorm with weight and variance_epsilon"
        if norm.weight.dtype != residual_dtype:
            return f"{name}.weight is {norm.weight.dtype}, the residual stream {residual_dtype}"
    matmuls: list[_Matmul] = [(inner.lm_head, "lm_head", None)]
    for i, layer in enumerate(body.layers):
        head_norms = [getattr(layer.self_attn, p, None) for p in ("q_norm", "k_norm")]
        if any(n is not None for n in head_norms):
            for part, norm in zip(("q_norm", "k_norm"), head_norms):
                weight = getattr(norm, "weight", None)
                shape = None if weight is None else tuple(weight.shape)
                if not hasattr(norm, "variance_epsilon") or shape != (head_dim,):
                    return f"layers.{i}.self_attn.{part} is not an RMSNorm over the head dim"
        for module, path, rows in _layer_matmuls(layer, config).values():
            matmuls.append((module, f"layers.{i}.{path}", rows))
    fused: dict[str, tuple[torch.nn.Module, int]] = {}  # rows the blocks of a fused layer cover
    for module, name, rows in matmuls:
        if module is None:
            return f"{name} is missing"
        reason = _linear_unsupported(module, name)
        if reason:
            return reason
        if rows is not None:
            fused[name] = (module, max(rows.stop, fused.get(name, (module, 0))[1]))
    for name, (module, covered) in fused.items():
        if _base(module).weight.shape[0] != covered:
            return f"{name} has {_base(module).weight.shape[0]} rows, its blocks {covered}"
    return None


class _Linear:
    """A matmul's effective weight (and bias) in the matmul dtype: a linear layer's, or a block
    of its rows (``rows``) where the model fuses several matmuls into one layer.

    The parameter itself (or a view of its rows) when it already has that dtype; otherwise a
    copy (cast, or with the active LoRA adapters merged) that :meth:`refresh` rewrites in place,
    so captured graphs keep reading the same memory."""

    def __init__(
        self,
        module: torch.nn.Module,
        dtype: torch.dtype,
        rows: slice | None = None,
        shared: _Linear | None = None,
    ):
        self.module = module
        self.dtype = dtype
        self.rows = slice(None) if rows is None else rows
        base = _base(module)
        self.copy_weight = _is_lora(module) or base.weight.dtype != dtype
        if shared is not None and (shared.module, shared.rows, shared.dtype) == (
            module, self.rows, dtype
        ):
            # Another kept decoder of the model holds this copy: both read the same memory
            # (each rollout refreshes it before use), not a second copy of the model.
            self.weight, self.bias, self.copy_bias = shared.weight, shared.bias, shared.copy_bias
            return
        self.weight = self._effective_weight() if self.copy_weight else self._base_weight()
        bias = base.bias
        self.copy_bias = bias is not None and bias.dtype != dtype
        if bias is None:
            self.bias = None
        else:
            bias = bias.detach()[self.rows]
            self.bias = bias.to(dtype) if self.copy_bias else bias

    def _base_weight(self) -> torch.Tensor:
        return _base(self.module).weight.detach()[self.rows]

    def _effective_weight(self) -> torch.Tensor:
        module = self.module
        if not _is_lora(module):
            return self._base_weight().to(self.dtype)
        weight = self._base_weight().float()
        if not module.merged and not getattr(module, "disable_adapters", False):
            for adapter in module.active_adapters:
                a = module.lora_A[adapter].weight.detach().float()
                b = module.lora_B[adapter].weight.detach()[self.rows].float()
                weight = weight + (b @ a) * module.scaling[adapter]
        return weight.to(self.dtype)

    def refresh(self) -> None:
        if self.copy_weight:
            self.weight.copy_(self._effective_weight())
        if self.copy_bias:
            self.bias.copy_(_base(self.module).bias.detach()[self.rows])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight, self.bias)


class _HeadNorm:
    """The RMSNorm of each query or key head (qwen3: over the head dim, before the rotary
    embedding), with its weight in the matmul dtype: the parameter, or a copy that
    :meth:`refresh` rewrites in place where the parameter's dtype differs."""

    def __init__(self, norm: torch.nn.Module, dtype: torch.dtype):
        self.norm = norm
        self.copy_weight = norm.weight.dtype != dtype
        self.weight = norm.weight.detach().to(dtype)

    def refresh(self) -> None:
        if self.copy_weight:
            self.weight.copy_(self.norm.weight.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, eps=self.norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclasses.dataclass(frozen=True)
class _Key:
    """What a cached decoder was built for; any change rebuilds it."""

    device: torch.device
    matmul_dtype: torch.dtype
    rows: int  # row capacity (a multiple of ROW_BUCKET)
    slots: int  # KV slot capacity (a multiple of SLOT_BUCKET)
    limit: int  # max_new_tokens
    sampling: tuple
    stops: tuple
    pad_token_id: int


@dataclasses.dataclass(frozen=True)
class _WeightCopies:
    """A kept decoder's weight copies (its layers' and LM head's), lent to a new decoder without
    keeping the old one's KV cache alive while the new one allocates its own."""

    layers: list
    lm_head: object


# ----------------------------------------------------------------------------- the decoder
class StaticDecoder:
    """Static-cache decoding for one model, one row/slot capacity and one sampling setting."""

    def __init__(self, model: torch.nn.Module, key: _Key, donor: _WeightCopies | None = None):
        """``donor``: the weight copies of a kept decoder of the same model, shared."""
        inner = _unwrap(model)
        config = inner.config
        body = inner.model
        self.key = key
        device, dtype = key.device, key.matmul_dtype
        self.embed = body.embed_tokens.weight
        self.residual_dtype = self.embed.dtype
        self.layers = []
        for layer in body.layers:
            matmuls = _layer_matmuls(layer, config)
            shared = donor.layers[len(self.layers)] if donor is not None else {}
            linears = {
                n: _Linear(m, dtype, rows, shared=shared.get(n))
                for n, (m, _, rows) in matmuls.items()
            }
            norms = dict(in_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm)
            for part in ("q_norm", "k_norm"):
                if getattr(layer.self_attn, part, None) is not None:
                    norms[part] = _HeadNorm(getattr(layer.self_attn, part), dtype)
            self.layers.append({**norms, **linears})
        # The RMSNorm before each layer, then the final one (each fused with the residual
        # addition before it, but the first).
        self.norms = [layer.input_layernorm for layer in body.layers] + [body.norm]
        self.lm_head = _Linear(inner.lm_head, dtype, shared=donor and donor.lm_head)
        self.heads, self.kv_heads, self.head_dim = _attention_shape(config)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        rotary = body.rotary_emb
        # longrope: original_inv_freq holds the short factors a forward over these lengths uses
        # (inv_freq holds the long ones after a long forward). Other types: inv_freq, the buffer
        # that follows the model's casts (transformers 4.x keeps original_inv_freq uncast).
        longrope = _rope_type(config) == "longrope"
        inv_freq = rotary.original_inv_freq if longrope else rotary.inv_freq
        self.inv_freq = inv_freq.detach().float().to(device)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)

        rows, slots, limit = key.rows, key.slots, key.limit
        shape = (rows, self.kv_heads, slots, self.head_dim)
        self.cache_k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.cache_v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.slot_mask = torch.zeros((rows, slots), dtype=torch.bool, device=device)
        self.tokens = torch.zeros((rows, limit), dtype=torch.int64, device=device)
        self.logps = torch.zeros((rows, limit), dtype=torch.float32, device=device)
        self.stop_pos = torch.zeros(rows, dtype=torch.int64, device=device)
        self.last_token = torch.zeros(rows, dtype=torch.int64, device=device)
        self.position = torch.zeros(rows, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # the token being sampled
        self.prompt_slots = torch.zeros((), dtype=torch.int64, device=device)  # P
        self.stops = ops.StopSequences([list(s) for s in key.stops], device) if key.stops else None
        self.sampling = dict(key.sampling)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    # ------------------------------------------------------------------ forward pieces
    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[b, 1, T, head_dim]`` for positions ``[b, T]`` (float32 angles, as the
        models compute them), in the residual dtype."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.residual_dtype)
        sin = (emb.sin() * self.rope_scaling).to(self.residual_dtype)
        return cos[:, None], sin[:, None]

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The model's RMSNorm of x, or of residual + x (then with that sum, the new residual
        stream): ops.rms_norm, one kernel on CUDA where the models' forward takes five."""
        eps = norm.variance_epsilon
        return ops.rms_norm(x.to(self.residual_dtype), norm.weight, eps=eps, residual=residual)

    def _forward(self, h: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers over the residual stream ``h [b, T, hidden]``, ending with the final
        norm; ``attend(i, layer, x)`` gives layer i's attention output ``[b, T, heads *
        head_dim]`` from its normalized input x. Each norm after the first takes the residual
        addition before it."""
        x = self._norm(self.norms[0], h)
        for i, layer in enumerate(self.layers):
            x, h = self._norm(layer["post_norm"], layer["o"](attend(i, layer, x)), residual=h)
            mlp = layer["down"](ops.silu_mul(layer["gate"](x), layer["up"](x)))
            x, h = self._norm(self.norms[i + 1], mlp, residual=h)
        return x

    def _projections(self, layer: dict, x: torch.Tensor):
        """q, k, v ``[b, T, heads, head_dim]`` of the normalized x, before rotary embeddings."""
        b, t, _ = x.shape
        q = layer["q"](x).view(b, t, self.heads, self.head_dim)
        k = layer["k"](x).view(b, t, self.kv_heads, self.head_dim)
        v = layer["v"](x).view(b, t, self.kv_heads, self.head_dim)
        if "q_norm" in layer:
            q, k = layer["q_norm"](q), layer["k_norm"](k)
        return q, k, v

    def _qkv(self, layer: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v ``[b, heads, T, head_dim]`` with q and k rotated, as the models do."""
        q, k, v = (t.transpose(1, 2) for t in self._projections(layer, x))
        dtype = self.key.matmul_dtype
        q = (q * cos + _rotate_half(q) * sin).to(dtype)
        k = (k * cos + _rotate_half(k) * sin).to(dtype)
        return q, k, v

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Runs the prompts ``[b, P]`` (left-padded), fills slots ``[0, P)``; last logits."""
        b, p = ids.shape
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keys = mask.bool()
        causal = torch.ones((p, p), dtype=torch.bool, device=ids.device).tril()
        allowed = (causal[None] & keys[:, None, :])[:, None]  # [b, 1, P, P]
        groups = self.heads // self.kv_heads
        cos, sin = self._rotary(positions)

        def attend(i: int, layer: dict, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(layer, x, cos, sin)
            self.cache_k[i][:b, :, :p] = k
            self.cache_v[i][:b, :, :p] = v
            # Padding queries see no key; a finite fill keeps them finite (their output is unused).
            attn = F.scaled_dot_product_attention(
                q,
                k.repeat_interleave(groups, dim=1),
                v.repeat_interleave(groups, dim=1),
                attn_mask=allowed | ~keys[:, None, :, None],
                scale=self.scale,
            )
            return attn.transpose(1, 2).reshape(b, p, -1)

        return self.lm_head(self._forward(F.embedding(ids, self.embed), attend)[:, -1])

    def _decode_forward(self, b: int) -> torch.Tensor:
        """One token per row for the first b rows: last_token at ``position`` into slot
        ``P + step - 1``; returns logits ``[b, V]``."""
        length = self.prompt_slots + self.step  # slots [0, P + step) hold the row so far
        mask = self.slot_mask[:b]
        mask.index_fill_(1, (length - 1).view(1), True)
        # The models' cos / sin (in the residual dtype) as the op's tables: the rotation happens
        # inside the attention op, rounding as the model's forward does. A bf16 / fp16 model
        # rotates its bf16 / fp16 q and k with tables of that dtype (each product rounded to
        # it): the same tables. Otherwise (float32 weights, under autocast or not) the products
        # are float32 ones: float32 tables (float64 for a float64 model).
        cos, sin = self._rotary(self.position[:b, None])
        if self.residual_dtype == self.key.matmul_dtype and self.residual_dtype.itemsize == 2:
            table = self.residual_dtype
        else:
            table = torch.float64 if self.residual_dtype == torch.float64 else torch.float32
        rotary = (cos[:, 0, 0].to(table), sin[:, 0, 0].to(table))

        def attend(i: int, layer: dict, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._projections(layer, x)
            # One kernel per layer: rotates q and k, writes k / v into the slot, attends over
            # [0, length) only.
            attn = ops.decode_attention(
                q[:, 0],
                self.cache_k[i][:b],
                self.cache_v[i][:b],
                length=length,
                new_k=k[:, 0],
                new_v=v[:, 0],
                slot_mask=mask,
                rotary=rotary,
                scale=self.scale,
            )
            return attn.reshape(b, 1, self.heads * self.head_dim)

        h = F.embedding(self.last_token[:b, None], self.embed)
        return self.lm_head(self._forward(h, attend)[:, -1])

    def _sample_and_record(self, logits: torch.Tensor, b: int) -> None:
        """Samples step ``self.step`` for the first b rows, records it, advances the step."""
        if logits.dtype == torch.float64:  # the sampler takes float32/bf16/fp16
            logits = logits.float()
        new, logp = ops.sample(logits, seed=self.seeds[:b], offset=self.step, **self.sampling)
        limit = self.key.limit
        stop_pos = self.stop_pos[:b]
        live = stop_pos == limit
        column = self.step.view(1)
        self.tokens[:b].index_copy_(
            1, column, torch.where(live, new, self.key.pad_token_id)[:, None]
        )
        self.logps[:b].index_copy_(1, column, torch.where(live, logp, 0.0)[:, None])
        if self.stops is not None:
            stop_pos.copy_(
                ops.stop_positions_step(
                    self.tokens[:b], self.stops, step=self.step, positions=stop_pos
                )
            )
        # A row whose logits were bad (NaN) gets id -1; never feed that to the embedding.
        self.last_token[:b].copy_(new.clamp(min=0))
        self.position[:b] += 1
        self.step += 1

    def _step(self, b: int) -> None:
        self._sample_and_record(self._decode_forward(b), b)

    def _run_step(self, b: int) -> None:
        """One decode step for the first b rows: eager on the CPU; on CUDA the bucket's graph,
        captured (after one eager step that warms up kernels and libraries) on first use.
        Eager too where the ops run their reference (``LATRO_BACKEND=torch``, or an extension
        without CUDA kernels): it reads values back to the host, which capture forbids."""
        if self.pool is None or not use_native(self.key.device):
            self._step(b)
            return
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
            return
        self._step(b)  # the warm-up is a real step; capture records without running
        torch.cuda.synchronize(self.key.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(b)
        self.graphs[b] = graph

    # ------------------------------------------------------------------ rows
    def _gather_rows(self, keep: torch.Tensor, b: int) -> None:
        """Moves rows ``keep`` (indices among the first b) to the front of every row buffer."""
        n = keep.shape[0]
        for buf in (
            *self.cache_k,
            *self.cache_v,
            self.slot_mask,
            self.tokens,
            self.logps,
            self.stop_pos,
            self.last_token,
            self.position,
            self.seeds,
        ):
            buf[:n] = buf[:b].index_select(0, keep)

    # ------------------------------------------------------------------ the loop
    def refresh_weights(self) -> None:
        for layer in self.layers:
            for piece in layer.values():
                if isinstance(piece, (_Linear, _HeadNorm)):
                    piece.refresh()
        self.lm_head.refresh()

    def decode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        seeds: torch.Tensor,
        tokens_out: torch.Tensor,
        logps_out: torch.Tensor,
        stop_pos_out: torch.Tensor,
        *,
        compact_every: int,
    ) -> None:
        """Decodes ``ids``/``mask`` ``[R, P]`` and writes each original row's tokens,
        log-probs and stop position into the ``*_out`` tensors (as the Hugging Face loop)."""
        rows, prompt = ids.shape
        limit = self.key.limit
        b = _round_up(rows, ROW_BUCKET)
        self.refresh_weights()
        for buf in (*self.cache_k, *self.cache_v):
            buf[:b].zero_()  # stale values in masked slots must stay finite
        self.slot_mask[:b].zero_()
        self.tokens[:b].fill_(self.key.pad_token_id)
        self.logps[:b].zero_()
        # Padding rows (up to the bucket) repeat row 0 but count as finished from the start.
        pad_rows = torch.zeros(b - rows, dtype=torch.int64, device=ids.device)
        ids = torch.cat([ids, ids[pad_rows]])
        mask = torch.cat([mask, mask[pad_rows]])
        self.slot_mask[:b, :prompt] = mask.bool()
        self.stop_pos[:b] = limit
        self.stop_pos[rows:b] = 0
        self.seeds[:b] = torch.cat([seeds, seeds[pad_rows]])
        self.position[:b] = mask.sum(-1) - 1  # the position of the last prompt token
        self.step.zero_()
        self.prompt_slots.fill_(prompt)
        origin = torch.arange(b, device=ids.device)  # original row of each buffer row
        origin[rows:] = -1

        self._sample_and_record(self._prefill(ids, mask), b)
        for step in range(1, limit + 1):
            check = step == limit or (compact_every > 0 and step % compact_every == 0)
            if check:
                live = self.stop_pos[:b] == limit
                n_live = int(live.sum())  # the loop's only host synchronization
                if n_live == 0 or step == limit:
                    break
                smaller = _round_up(n_live, ROW_BUCKET)
                if smaller < b:
                    self._write_out(origin, b, tokens_out, logps_out, stop_pos_out)
                    keep = live.nonzero().squeeze(1)
                    keep = torch.cat([keep, keep[:1].expand(smaller - n_live)])
                    self._gather_rows(keep, b)
                    origin = origin[keep]
                    origin[n_live:] = -1
                    self.stop_pos[n_live:smaller] = 0
                    b = smaller
            self._run_step(b)
        self._write_out(origin, b, tokens_out, logps_out, stop_pos_out)

    def _write_out(self, origin, b, tokens_out, logps_out, stop_pos_out) -> None:
        real = (origin >= 0).nonzero().squeeze(1)
        rows = origin[real]
        tokens_out[rows] = self.tokens[:b][real]
        logps_out[rows] = self.logps[:b][real]
        stop_pos_out[rows] = self.stop_pos[:b][real]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _matmul_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    weight_dtype = _unwrap(model).lm_head.weight.dtype
    if weight_dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def decode_static(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    seeds: torch.Tensor,
    tokens_out: torch.Tensor,
    logps_out: torch.Tensor,
    stop_pos_out: torch.Tensor,
    *,
    stop_sequences: Sequence[Sequence[int]],
    sampling: dict,
    pad_token_id: int,
    compact_every: int,
) -> None:
    """The static-cache decode loop behind :func:`latro_engine.rollout.sample_rationales`
    (``decoder="static"``); the model must pass :func:`static_decoder_unsupported`."""
    device = ids.device
    rows, prompt = ids.shape
    limit = tokens_out.shape[1]
    key = _Key(
        device=device,
        matmul_dtype=_matmul_dtype(model, device),
        rows=_round_up(rows, ROW_BUCKET),
        slots=_round_up(prompt + limit, SLOT_BUCKET),
        limit=limit,
        sampling=tuple(
            sorted((k, ops.check_top_k(v) if k == "top_k" else float(v)) for k, v in sampling.items())
        ),
        stops=tuple(tuple(int(t) for t in s) for s in stop_sequences),
        pad_token_id=int(pad_token_id),
    )
    # The decoder holds references to the parameters: if any was replaced (not updated in
    # place, e.g. load_state_dict(assign=True) or .to()), it must be rebuilt.
    params = tuple(p.data_ptr() for p in model.parameters())
    kept = [d for d in _DECODERS.get(model, []) if d.params == params]
    decoder = next((d for d in kept if _fits(d.key, key)), None)
    if decoder is None:
        # A kept decoder with these settings but too few rows or slots (a longer prompt than
        # any before, a larger batch) is replaced by one with the larger of each capacity,
        # where that cache is no larger than the two would be: it serves every call the old
        # one did, so training whose prompts grow does not hold two KV caches for its
        # rollouts until evaluation happens to evict one.
        outgrown = [d.key for d in kept if _same_settings(d.key, key) and _merge_pays(d.key, key)]
        key = dataclasses.replace(
            key,
            rows=max([key.rows, *(k.rows for k in outgrown)]),
            slots=max([key.slots, *(k.slots for k in outgrown)]),
        )
        donor = _WeightCopies(kept[-1].layers, kept[-1].lm_head) if kept else None
        kept = [d for d in kept if d.key not in outgrown]
        kept = kept[-(KEPT_DECODERS - 1) :] if KEPT_DECODERS > 1 else []
        _DECODERS[model] = kept  # drop the others (their KV caches) before allocating a new one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        decoder = StaticDecoder(model, key, donor=donor)
        decoder.params = params
    else:
        kept.remove(decoder)
    _DECODERS[model] = [*kept, decoder]  # most recently used last
    with torch.autocast(device.type, enabled=False):  # dtypes are explicit in the decoder
        decoder.decode(
            ids, mask, seeds, tokens_out, logps_out, stop_pos_out, compact_every=compact_every
        )


def _same_settings(have: _Key, want: _Key) -> bool:
    """The keys differ at most in their row and slot capacities."""
    return dataclasses.replace(have, rows=want.rows, slots=want.slots) == want


def _merge_pays(have: _Key, want: _Key) -> bool:
    """One cache of the larger of each capacity holds no more slots than the two apart (a call
    of many short rows and one of a few long ones would not: they stay two decoders)."""
    union = max(have.rows, want.rows) * max(have.slots, want.slots)
    return union <= have.rows * have.slots + want.rows * want.slots


def _fits(have: _Key, want: _Key) -> bool:
    """A decoder built for ``have`` serves ``want``: same settings, enough rows and slots."""
    return _same_settings(have, want) and have.rows >= want.rows and have.slots >= want.slots


def release_static_decoder(model: torch.nn.Module) -> None:
    """Frees the decoders (KV caches, weight copies, CUDA graphs) kept for ``model``."""
    _DECODERS.pop(model, None)
