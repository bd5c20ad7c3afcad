"""Python-side registrations for the native ops: fake (meta) kernels so torch.compile and
FakeTensor tracing see shapes without running the kernels, and autograd formulas for the three
differentiable ops. Imported by :mod:`latro_engine.ops` when the extension is loaded."""

from __future__ import annotations

import torch

_LIB = "latro_engine"


def _scores_like(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake(f"{_LIB}::token_logprobs")
def _(logits, targets, ignore_index):
    shape = logits.shape[:-1]
    return _scores_like(logits, shape), _scores_like(logits, shape)


@torch.library.register_fake(f"{_LIB}::token_logprobs_backward")
def _(grad_logprobs, logits, targets, lse, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{_LIB}::token_logprobs_backward_")
def _(grad_logprobs, logits, targets, lse, ignore_index):
    return None


@torch.library.register_fake(f"{_LIB}::linear_token_logprobs")
def _(hidden, weight, bias, targets, chunk_size, ignore_index):
    shape = hidden.shape[:1]
    return _scores_like(hidden, shape), _scores_like(hidden, shape)


def _grad_like(t, wanted):
    """A gradient of t's shape where wanted, else an empty tensor (the native ops' way)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else t.new_empty(0)


def _linear_grads_like(hidden, weight, bias, hidden_grad, weight_grad, bias_grad):
    return (
        _grad_like(hidden, hidden_grad),
        _grad_like(weight, weight_grad),
        _grad_like(bias if bias is not None else hidden.new_empty(0), bias_grad),
    )


@torch.library.register_fake(f"{_LIB}::linear_token_logprobs_backward")
def _(grad_logprobs, hidden, weight, bias, targets, lse, chunk_size, ignore_index, hidden_grad,
      weight_grad, bias_grad):
    return _linear_grads_like(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)


@torch.library.register_fake(f"{_LIB}::linear_weighted_logprob_sum")
def _(hidden, weight, bias, targets, token_weights, chunk_size, ignore_index, hidden_grad,
      weight_grad, bias_grad):
    return (
        _scores_like(hidden, torch.Size([])),
        _scores_like(hidden, hidden.shape[:1]),
        *_linear_grads_like(hidden, weight, bias, hidden_grad, weight_grad, bias_grad),
    )


@torch.library.register_fake(f"{_LIB}::sample")
def _(logits, seeds, offset, temperature, top_k, top_p, min_p):
    rows = logits.shape[:1]
    return logits.new_empty(rows, dtype=torch.int64), _scores_like(logits, rows)


@torch.library.register_fake(f"{_LIB}::stop_positions")
def _(tokens, stop_tokens, stop_offsets, start):
    return tokens.new_empty(tokens.shape[:1])


@torch.library.register_fake(f"{_LIB}::stop_positions_step")
def _(tokens, stop_tokens, stop_offsets, step, positions, start):
    return tokens.new_empty(tokens.shape[:1])


@torch.library.register_fake(f"{_LIB}::decode_attention")
def _(query, cache_k, cache_v, new_k, new_v, slot_mask, rotary_cos, rotary_sin, length, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{_LIB}::rms_norm")
def _(x, weight, residual, eps):
    contiguous = torch.contiguous_format
    total = torch.empty_like(x, memory_format=contiguous) if residual is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=contiguous), total


@torch.library.register_fake(f"{_LIB}::silu_mul")
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{_LIB}::rloo_advantages")
def _(rewards, k):
    return torch.empty_like(rewards)


@torch.library.register_fake(f"{_LIB}::latro_rewards")
def _(
    answer_logp,
    rationale_logp,
    ref_rationale_logp,
    finished,
    kl_coef,
    nonstop_penalty,
    penalty_mode,
):
    return torch.empty_like(answer_logp)


# ----------------------------------------------------------------------------- autograd
# Both ops return (logprobs, lse). With upstream gradients g (logprobs) and h (lse) the logits
# get g * onehot(target) - (g - h) * softmax: the kernels compute u * (onehot - softmax) for any
# per-row u, so they run with u = g - h and h * onehot(target) is added on top. Rows whose
# target is ignore_index have constant outputs (0) and get no gradient.
def _upstream(grad_logprobs, grad_lse, lse):
    g = grad_logprobs if grad_logprobs is not None else torch.zeros_like(lse)
    return g if grad_lse is None else g - grad_lse


def _lse_target_weight(grad_lse, targets, ignore_index):
    """h masked to the rows with a real target, and those targets made safe to index."""
    kept = targets != ignore_index
    return torch.where(kept, grad_lse, 0.0), torch.where(kept, targets, 0)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index
    ctx.set_materialize_grads(False)  # an unused output then brings None, not zeros


def _token_logprobs_backward(ctx, grad_logprobs, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    grad = torch.ops.latro_engine.token_logprobs_backward(
        _upstream(grad_logprobs, grad_lse, lse), logits, targets, lse, ctx.ignore_index
    )
    if grad_lse is not None:
        weight, safe = _lse_target_weight(grad_lse, targets, ctx.ignore_index)
        grad = grad.scatter_add(-1, safe.unsqueeze(-1), weight.unsqueeze(-1).to(grad.dtype))
    return grad, None, None


torch.library.register_autograd(
    f"{_LIB}::token_logprobs", _token_logprobs_backward, setup_context=_token_logprobs_setup
)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, chunk_size, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.chunk_size, ctx.ignore_index = chunk_size, ignore_index
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_logprobs, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    # Only the gradients autograd asks for (a frozen LM head: no [V, D] weight gradient).
    wants = [bool(w) for w in ctx.needs_input_grad[:3]]
    wants[2] = wants[2] and ctx.has_bias
    grads = list(torch.ops.latro_engine.linear_token_logprobs_backward(
        _upstream(grad_logprobs, grad_lse, lse),
        hidden,
        weight,
        bias,
        targets,
        lse,
        ctx.chunk_size,
        ctx.ignore_index,
        *wants,
    ))
    if grad_lse is not None:
        h, safe = _lse_target_weight(grad_lse, targets, ctx.ignore_index)
        h = h.to(hidden.dtype)
        if wants[0]:
            grads[0] = grads[0] + h.unsqueeze(-1) * weight[safe]
        if wants[1]:
            grads[1] = grads[1].index_add(0, safe, h.unsqueeze(-1) * hidden)
        if wants[2]:
            grads[2] = grads[2].index_add(0, safe, h)
    grad_hidden, grad_weight, grad_bias = (g if w else None for g, w in zip(grads, wants))
    return grad_hidden, grad_weight, grad_bias, None, None, None


torch.library.register_autograd(
    f"{_LIB}::linear_token_logprobs", _linear_backward, setup_context=_linear_setup
)


# The backward kernels have no derivative of their own: a second-order gradient through them
# (create_graph=True, then backward again) is refused, not silently zero.
def _double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"{op}: second-order gradients (double backward) are not supported by the native "
        "kernels; LATRO_BACKEND=torch runs the ops' pure-torch reference, which has them"
    )


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise _double_backward_error(op)

    return backward


for _op in ("token_logprobs_backward", "linear_token_logprobs_backward"):
    torch.library.register_autograd(
        f"{_LIB}::{_op}", _no_double_backward(_op.removesuffix("_backward")),
        setup_context=lambda ctx, inputs, output: None,
    )


# linear_weighted_logprob_sum computed the gradients of its total in the forward; the backward
# scales them by the upstream gradient of the total and hands each out once. Its other outputs
# carry no gradient.
def _scaled(grad, upstream):
    # In place when eager (no second [V, D] buffer beside an LM head's gradient); functionally
    # when traced (torch.compile, AOT: FakeTensor / FunctionalTensor subclasses), where a
    # backward may not update a forward output in place.
    if type(grad) is torch.Tensor and type(upstream) is torch.Tensor:
        return grad.mul_(upstream)
    return grad * upstream


def _weighted_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.grads = list(output[2:])
    ctx.wanted = inputs[7:]
    ctx.set_materialize_grads(False)


def _weighted_backward(ctx, grad_total, *unused):
    if ctx.grads is None:
        raise RuntimeError(
            "linear_weighted_logprob_sum: its gradients were computed in the forward and are "
            "handed out once; backward through it twice (retain_graph) is not supported"
        )
    # Grad mode is on in a backward only with create_graph=True: the gradients it hands out were
    # computed in the forward and would carry no graph (a default upstream gradient of ones
    # does not require grad, so that alone cannot tell).
    if torch.is_grad_enabled():
        raise _double_backward_error("linear_weighted_logprob_sum")
    grads, ctx.grads = ctx.grads, None
    out = [
        _scaled(grad, grad_total) if wanted and grad_total is not None else None
        for grad, wanted in zip(grads, ctx.wanted)
    ]
    return out[0], out[1], out[2], None, None, None, None, None, None, None


torch.library.register_autograd(
    f"{_LIB}::linear_weighted_logprob_sum", _weighted_backward, setup_context=_weighted_setup
)
