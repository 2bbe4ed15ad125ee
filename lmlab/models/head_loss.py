"""The LM head and its cross-entropy in one pass, without the full logits (Liger's FusedLinearCrossEntropy idea).

A language model's last step, `cross_entropy(hidden @ W.T, targets)`, is the most memory-hungry part of a small
model's training step: for 8 x 256 tokens over GPT-2's 50k vocabulary the logits are 2048 x 50304, 206 MB in bf16,
412 MB once upcast to fp32 for the softmax, and the unfused backward allocates (and zero-fills) another tensor of
that size for the gradient of the logits. `linear_cross_entropy` walks the rows in chunks: for each chunk it
computes the logits in the compute dtype, their log-sum-exp in fp32, and, when gradients are wanted, the gradient
of the logits right away (softmax - onehot, over the number of counted targets), which it turns into the gradient
of the hidden states and adds into the gradient of the head's weight. Nothing of vocabulary size outlives a chunk,
and the backward pass only scales the stored gradients by the incoming one (the loss is a scalar).

The matmuls are the unfused ones (logits, dlogits @ W, dlogits.T @ hidden); what goes is the fp32 logits tensor,
its separate log-softmax forward and backward, the zero-filled gradient and the scatter of the targets into it.
Targets equal to `ignore_index` count for nothing, as in F.cross_entropy; the mean is over the counted targets.
"""

from __future__ import annotations

import torch

# Rows per chunk. A chunk holds its fp32 logits (1024 x 50k is 206 MB; the unfused path holds 1.2 GB for 8 x 256
# tokens, and more as the batch grows), and the head weight's fp32 gradient is read and written once per chunk: on
# one CPU core 256-row chunks cost 5-10 % of the step in those passes, 1024 rows nothing measurable.
CHUNK_ROWS = 1024


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use here (bf16 under bf16 autocast), else the tensor's own."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ignore_index: int, with_grad: bool):
    """Summed cross-entropy of one chunk's counted targets and, with_grad, softmax - onehot of its logits, in h's
    dtype, unscaled (the caller scales the small matrices it is multiplied into, not this vocabulary-wide one)."""
    # One pass from the compute-dtype logits to fp32 log-probabilities (no separate upcast copy).
    logp = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
    valid = y != ignore_index
    safe = torch.where(valid, y, 0)[:, None]
    target_logp = logp.gather(1, safe)
    loss = -(target_logp[:, 0] * valid).sum()
    if not with_grad:
        return loss, None
    # exp of the fp32 log-probabilities written straight in the compute dtype (one pass); the target's entry,
    # p - 1, is computed in fp32 before rounding (p near 1 would lose it in bf16).
    grad = torch.exp(logp, out=torch.empty_like(logp, dtype=h.dtype))
    grad.scatter_(1, safe, torch.expm1(target_logp).to(h.dtype))
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, compute_dtype):
        # The mean's divisor as a tensor, not a Python number: no sync, and torch.compile traces through it.
        count = (targets != ignore_index).sum().clamp(min=1).float()
        # d(mean loss)/d(logits) of a row is (softmax - onehot) / count, 0 for an ignored target.
        row_scale = ((targets != ignore_index) / count)[:, None]
        h_all = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = h_all[rows]
            loss, grad_logits = _chunk_loss(h, w, targets[rows], ignore_index, with_grad=True)
            total += loss
            grad_hidden[rows] = (grad_logits @ w) * row_scale[rows]
            grad_weight += (grad_logits.T @ (h * row_scale[rows]).to(compute_dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """mean cross_entropy(hidden @ weight.T, targets) over the targets that are not ignore_index, without the
    full logits. hidden (..., C), weight (V, C), targets (...). Differentiable in hidden and weight; under
    autocast the matmuls run in the autocast dtype and the softmax in fp32, as the unfused path does. With every
    target ignored the loss is 0 (F.cross_entropy's is NaN) and so are the gradients."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, dtype)
        # No gradient wanted (evaluation): the chunked forward alone.
        w = weight.to(dtype)
        total = sum(_chunk_loss(hidden[s:s + chunk_rows].to(dtype), w, targets[s:s + chunk_rows], ignore_index,
                                with_grad=False)[0] for s in range(0, hidden.shape[0], chunk_rows))
        count = (targets != ignore_index).sum().clamp(min=1)
        return total / count

