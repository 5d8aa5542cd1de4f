"""Log-probabilities of tokens under logits, in chunks, with fused autograd kernels.

Every trainer turns logits into the log-probability of the tokens it saw (and, for RL, the entropy). The logits
of a step are large (a GRPO step of 32 x 64 tokens: 2048 x 49k values), so these functions work through them in
row chunks with hand-written backward passes (:class:`_TokenLogps`), and :func:`linear_token_logps` fuses the LM
head's matmul with the log-softmax so the full logits never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of logits per chunk: 2**22 fp32 values (16 MB). A step's logits are large (a GRPO step
# of 32 x 64 tokens: 2048 x 49k); full-size fp32 temporaries (upcast, exp, softmax, their
# gradients) cost page faults and memory traffic, chunks reuse one small buffer: about a
# quarter less time than unchunked on CPU (see benchmarks/README.md, "Design measurements").
_CHUNK_VALUES = 1 << 22
# On CUDA each chunk is a few kernel launches, not a cache-sized working set: 2**26 values (256 MB in fp32) per chunk,
# so a 65k-token x 128k-vocabulary pass takes ~130 iterations, not ~2,000 (issue 21, item 11; not yet timed on a GPU).
_CUDA_CHUNK_VALUES = 1 << 26


def chunk_values(device: torch.device) -> int:
    """Logit values per chunk of the log-prob passes on ``device``: cache-sized on CPU, launch-amortising on GPUs."""
    return _CHUNK_VALUES if device.type == "cpu" else _CUDA_CHUNK_VALUES


def _chunk_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
    """``(logps, lse, entropy or None)``, each (n,) fp32, of a chunk of logits (n, V) in fp32."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    # One exp pass serves both: e = exp(z - max), lse = max + log sum e, p = e / sum e.
    top = z.amax(dim=-1, keepdim=True)
    e = (z - top).exp_()
    total = e.sum(-1)
    lse = top.squeeze(-1) + total.log()
    logps = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    entropy = lse - (e * z).sum(-1) / total if with_entropy else None  # H = lse - sum_v p_v z_v
    return logps, lse, entropy


def _chunk_logps_grad(
    logits: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``scale * d logp / d logits = scale * (1[v = token] - softmax(z)_v) / T`` of a chunk, fp32 (n, V), a new tensor.

    ``scale`` (n,) is the incoming gradient already divided by ``T``.
    """
    z = logits.float() / temperature if temperature != 1.0 else logits.to(torch.float32, copy=True)
    g = torch.exp(z.sub_(lse[:, None])).mul_(-scale[:, None])  # -softmax * scale
    return g.scatter_add_(-1, tokens[:, None], scale[:, None])


def _logps_in_chunks(logits, tokens, temperature, with_entropy, chunk_rows, logps, lse, entropy, offset: int = 0):
    """Fill rows ``offset..`` of ``logps``/``lse``/``entropy`` from ``logits``, ``chunk_rows`` rows at a time."""
    for sub in range(0, logits.shape[0], chunk_rows):
        part = logits[sub : sub + chunk_rows]
        at = slice(offset + sub, offset + sub + part.shape[0])
        logps[at], lse[at], ent = _chunk_logps(part, tokens[at], temperature, with_entropy)
        if with_entropy:
            entropy[at] = ent


def _logps_outputs(ctx, logps, entropy):
    if entropy is None:
        return logps
    ctx.mark_non_differentiable(entropy)
    return logps, entropy


def _logps_grad_in_chunks(grad, logits, lse, tokens, grad_logps, temperature, chunk_rows) -> None:
    """Write the gradient of the log-probs w.r.t. ``logits`` into ``grad`` (may be ``logits`` itself)."""
    scale = grad_logps.float() / temperature
    for start in range(0, logits.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        grad[rows] = _chunk_logps_grad(logits[rows], lse[rows], tokens[rows], scale[rows], temperature)


class _TokenLogps(torch.autograd.Function):
    """``log softmax(z)[token]`` and (without gradient) the entropy of ``softmax(z)``, ``z = logits / T``.

    Forward and backward both walk the rows in chunks, in fp32, and keep only the
    (N,) log-normalisers between them. Gradient: ``d logp / d logits_v =
    (1[v = token] - softmax(z)_v) / T``.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, with_entropy, chunk_rows):
        n = logits.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else None
        _logps_in_chunks(logits, tokens, temperature, with_entropy, chunk_rows, logps, lse, entropy)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return _logps_outputs(ctx, logps, entropy)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        _logps_grad_in_chunks(grad, logits, lse, tokens, grad_logps, ctx.temperature, ctx.chunk_rows)
        return grad, None, None, None, None


class _LinearTokenLogps(torch.autograd.Function):
    """:class:`_TokenLogps` of ``logits = x @ weight.T (+ bias)``, the product computed a block of rows at a time.

    Forward: each row block's logits are written into one (N, V) buffer (only a
    block-sized one when no gradient is needed) and reduced to log-probs while
    still warm in cache. Backward: the softmax gradient overwrites that buffer in
    place, then the two products of the linear's backward read it; no second
    (N, V) tensor is allocated.

    ``recompute``: the forward keeps no logits even when a gradient follows; the backward computes each block's
    logits again, turns them into their gradient in place and adds that block's share to the input's, weight's and
    bias's gradients (the weight's and bias's summed in fp32). Memory is one block of logits instead of (N, V), for one
    more head product: the trade for GPUs, where (N, V) at long sequences and large vocabularies is gigabytes
    (as Liger-Kernel's fused linear cross-entropy makes it; here the upstream gradient is any loss's).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tokens, temperature, with_entropy, block_rows, chunk_rows, keep, recompute=False):
        n, vocab = x.shape[0], weight.shape[0]
        logits = x.new_empty(n if keep else min(n, block_rows), vocab)
        logps = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else None
        for start in range(0, n, block_rows):
            rows = slice(start, start + block_rows)
            out = logits[rows] if keep else logits[: x[rows].shape[0]]
            _block_logits(x[rows], weight, bias, out)
            _logps_in_chunks(out, tokens, temperature, with_entropy, chunk_rows, logps, lse, entropy, offset=start)
        ctx.save_for_backward(x, weight, tokens, lse, logits if keep else None, bias if recompute else None)
        ctx.temperature, ctx.chunk_rows, ctx.has_bias = temperature, chunk_rows, bias is not None
        ctx.recompute, ctx.block_rows = recompute, block_rows
        return _logps_outputs(ctx, logps, entropy)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        x, weight, tokens, lse, grad, bias = ctx.saved_tensors  # grad: the logits, overwritten below
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        needs_b = needs_b and ctx.has_bias
        if ctx.recompute:
            return _recomputed_linear_grads(x, weight, bias, tokens, lse, grad_logps, ctx, needs_x, needs_w, needs_b)
        _logps_grad_in_chunks(grad, grad, lse, tokens, grad_logps, ctx.temperature, ctx.chunk_rows)
        grad_x = grad @ weight if needs_x else None
        grad_w = grad.t() @ x if needs_w else None
        grad_b = grad.sum(0) if needs_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _block_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ weight.T (+ bias)``, written into a block of the logits buffer."""
    torch.mm(x, weight.t(), out=out)
    if bias is not None:
        out += bias


def _recomputed_linear_grads(x, weight, bias, tokens, lse, grad_logps, ctx, needs_x, needs_w, needs_b) -> tuple:
    """The gradients of :class:`_LinearTokenLogps` with ``recompute``: a block of rows at a time, the logits again,
    their gradient in place, then that block's products."""
    n = x.shape[0]
    buffer = x.new_empty(min(n, ctx.block_rows), weight.shape[0])
    grad_x = torch.empty_like(x) if needs_x else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs_b else None
    for start in range(0, n, ctx.block_rows):
        rows = slice(start, start + ctx.block_rows)
        block = buffer[: x[rows].shape[0]]
        _block_logits(x[rows], weight, bias, block)
        _logps_grad_in_chunks(block, block, lse[rows], tokens[rows], grad_logps[rows], ctx.temperature, ctx.chunk_rows)
        if grad_x is not None:
            torch.mm(block, weight, out=grad_x[rows])
        if grad_w is not None:
            grad_w += block.t() @ x[rows]
        if grad_b is not None:
            grad_b += block.sum(0, dtype=torch.float32)
    return (
        grad_x,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
        None, None, None, None, None, None, None,
    )  # fmt: skip


def linear_token_logps(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    block_rows: int = 256,
    recompute: bool = False,
):
    """:func:`gather_logps` (and, with ``with_entropy``, the entropy) of ``logits = x @ weight.T + bias``.

    Shapes: ``x`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``tokens`` (N,) ->
    ``logps`` (N,) fp32, or ``(logps, entropy)``. The same values as computing the
    logits and then :func:`gather_logps_and_entropy`, with the output layer and the
    log-softmax fused: the product runs ``block_rows`` rows at a time (on CPU
    about 30% less time than one product; see benchmarks/README.md, "Design measurements")
    and the backward writes the logits' gradient over the logits. Matmuls
    run in the dtype of ``x``/``weight`` (cast them first for reduced precision). ``recompute``: no (N, V) logits are
    kept for the backward, which computes them again block by block (one more product; memory of one block).
    """
    # Keep the (N, V) logits for a backward only when one can follow: grad mode on and an input that needs it
    # (inside the Function, grad mode is always off; a policy's log-probs under no_grad need none).
    keep = not recompute and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _LinearTokenLogps.apply(
        x,
        weight,
        bias,
        tokens,
        float(temperature),
        with_entropy,
        block_rows,
        max(1, chunk_values(x.device) // weight.shape[0]),
        keep,
        recompute,
    )


def _token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
    shape, vocab = tokens.shape, logits.shape[-1]
    out = _TokenLogps.apply(
        logits.reshape(-1, vocab),
        tokens.reshape(-1),
        float(temperature),
        with_entropy,
        max(1, chunk_values(logits.device) // vocab),
    )
    if with_entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)


def gather_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    Shapes: ``logits`` (..., V), ``tokens`` (...) -> (...), fp32. Computed as
    ``z[token] - logsumexp(z)`` with ``z = logits / temperature`` in fp32, a chunk of
    rows at a time, without materialising the full log-softmax (or its gradient's
    temporaries). Dividing by the sampling temperature makes these the log-probs
    of the distribution the tokens were actually sampled from.
    """
    return _token_logps(logits, tokens, temperature, with_entropy=False)


def gather_logps_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_logps` and, without gradient, :func:`entropy_from_logits` of ``logits / temperature``.

    Shapes: ``logits`` (..., V), ``tokens`` (...) -> ``(logps (...), entropy (...))``.
    One pass over the logits serves both (an RL step computes them over every
    response token: 2048 x 49k for a GRPO step of 32 x 64): ``H = lse - sum_v p_v z_v``
    with ``p = softmax(z)``, since ``log p_v = z_v - lse``.
    """
    return _token_logps(logits, tokens, temperature, with_entropy=True)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position. Shape: (..., V) -> (...)."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
