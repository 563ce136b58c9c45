"""Fused LM head + cross-entropy: the summed loss and its gradients without (T, V) logits.

    loss = linear_cross_entropy_sum(h, weight, labels, chunk=None)
    loss, correct = linear_cross_entropy_sum(h, weight, labels, return_correct=True)   # evaluation only


h (T, C) in any float dtype, weight (V, C), labels (T,) int64 with -100 = ignore. Returns the fp32 scalar
sum over labelled t of CE(h[t] @ weight.T, labels[t]) -- what
F.cross_entropy(F.linear(h, weight).float(), labels, reduction="sum", ignore_index=-100) returns -- and is
differentiable wrt h and weight. For Qwen2.5's vocab (151,936) the logits of a 16k-token pack are 9.3 GiB in
fp32; here one chunk of rows lives at a time (about 1 GiB).

How (the layout of Liger-Kernel's FusedLinearCrossEntropy):
- Only labelled rows are computed: an ignored row has zero loss and zero gradient, and in SFT about half the
  tokens (system, user, tool turns) are ignored, so this skips half of the LM head's work.
- The forward loops over chunks of labelled rows: one matmul gives the chunk's logits, one row-wise pass turns
  them in place into d loss / d logits = softmax - onehot (log-sum-exp in fp32) and the per-row losses, and two
  more matmuls give the chunk's rows of dh and its share of dW (accumulated in fp32). So the gradients exist when
  the forward returns; backward only scales them by grad_output. Three matmuls per row, as unfused, no recompute.
- Compute dtype: the autocast dtype when autocast is on for h's device (what F.linear would use), else h's dtype;
  weight is cast to it. Logits are rounded to it as an unfused F.linear's would be, then upcast for the softmax.
- The row-wise pass is a Triton kernel on CUDA (read the row twice, write the gradient once, in the compute
  dtype) and plain torch elsewhere; `impl` picks one explicitly (tests run the kernel under TRITON_INTERPRET=1).

Evaluation (no grad) can also return `correct` (T,) bool: labels[t] is the first maximal logit of row t, i.e.
what torch.argmax and so greedy decoding pick (a tie resolved to a lower index is not correct); False on ignored
rows. The row pass computes it beside the log-sum-exp, so no (T, V) logits exist for it either.

Memory: one chunk's logits in the compute dtype (+ an fp32 copy on the torch path), dW in fp32 (V, C) and dh
(T, C) from forward until backward. One host sync per call (counting the labelled rows sizes the loop).

Not supported: bias on the head, label smoothing, z-loss, logit softcap, other reductions or ignore indices,
a vocab split over ranks. Labels must lie in [0, V) or be -100 (not checked: that would cost another sync).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

IGNORE = -100
LOGITS_BUDGET = 1 << 30  # bytes of fp32 logits per chunk: 1 GiB is ~1.7k rows at V = 151,936


def default_chunk(vocab_size):
    """Rows per chunk so its fp32 logits fit LOGITS_BUDGET; a multiple of 64 for the matmuls, at most 8192."""
    rows = min(8192, LOGITS_BUDGET // (4 * vocab_size))
    return max(64, rows // 64 * 64)


# --------------------------------------------------------------------------------------------------------------------
# Reference


def linear_cross_entropy_reference(h, weight, labels):
    """The unfused computation: full (T, V) logits in the input dtype, cross-entropy in fp32."""
    return F.cross_entropy(F.linear(h, weight).float(), labels, reduction="sum", ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------------------------------
# Row-wise pass: per-row loss, and logits -> d loss / d logits in place


@triton.jit
def _ce_rows_kernel(X, stride_x, Y, LOSS, CORRECT, V, WRITE_GRAD: tl.constexpr, WRITE_CORRECT: tl.constexpr,
                    BLOCK: tl.constexpr):
    # One program per row. Pass 1: online max / sum of exp over the row in fp32 -> log-sum-exp and the loss
    # (and, for `correct`, the max over the columns before y). Pass 2: overwrite the row with softmax - onehot in
    # X's dtype (what autograd of the unfused head feeds the matmuls: the fp32 logit gradient rounded to the
    # compute dtype).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y = tl.load(Y + row)
    m = float("-inf")
    m_before = float("-inf")  # max over columns < y: argmax picks the first maximum, so these must stay below x_y
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)  # rescale the old sum to the new max
        m = m_new
        if WRITE_CORRECT:
            m_before = tl.maximum(m_before, tl.max(tl.where(cols < y, x, float("-inf")), 0))
    lse = m + tl.log(s)
    x_y = tl.load(x_row + y).to(tl.float32)  # read before pass 2 overwrites it
    tl.store(LOSS + row, lse - x_y)
    if WRITE_CORRECT:  # the fp32 upcast is exact, so these compare the compute-dtype logits themselves
        tl.store(CORRECT + row, ((x_y >= m) & (m_before < x_y)).to(tl.int8))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
            tl.store(x_row + cols, g.to(X.dtype.element_ty), mask=cols < V)


def _ce_rows_triton(logits, y, write_grad, correct=None):
    """Per-row losses (t,); with correct (t,) int8 given, it receives whether y is the row's first argmax."""
    t, V = logits.shape
    losses = torch.empty(t, dtype=torch.float32, device=logits.device)
    if logits.is_cuda:
        block, warps = min(triton.next_power_of_2(V), 4096), 8  # 16 fp32 per thread per tile; memory bound
    else:
        block, warps = min(triton.next_power_of_2(V), 32), 1  # interpreter: small tiles so tests span several
    _ce_rows_kernel[(t,)](logits, logits.stride(0), y, losses, losses if correct is None else correct, V,
                          WRITE_GRAD=write_grad, WRITE_CORRECT=correct is not None, BLOCK=block, num_warps=warps)
    return losses


def _ce_rows_torch(logits, y, write_grad, correct=None):
    if correct is not None:  # torch.argmax returns the first maximal index, as greedy decoding takes it
        correct.copy_(logits.argmax(dim=-1) == y)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (t, V) fp32
    losses = -logp.gather(1, y[:, None]).squeeze(1)  # (t,)
    if write_grad:
        grad = logp.exp_()  # softmax
        grad[torch.arange(len(y), device=y.device), y] -= 1.0
        logits.copy_(grad)
    return losses


# --------------------------------------------------------------------------------------------------------------------
# Chunked forward that also produces the gradients


def _forward(h, weight, labels, chunk, dtype, impl, need_dh, need_dw, need_correct=False):
    ce_rows = _ce_rows_triton if impl == "triton" else _ce_rows_torch
    rows = (labels != IGNORE).nonzero().squeeze(1)  # host sync: the loop below needs the count
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros(labels.shape, dtype=torch.int8, device=h.device) if need_correct else None
    grad_h = torch.zeros_like(h) if need_dh else None  # ignored rows keep a zero gradient
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    w = weight.to(dtype)  # (V, C); a no-op when it already is
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        hc = h[r].to(dtype)  # (t, C)
        logits = hc @ w.T  # (t, V), rounded to the compute dtype like F.linear's output
        ok = torch.empty(len(r), dtype=torch.int8, device=h.device) if need_correct else None
        loss += ce_rows(logits, labels[r], need_dh or need_dw, ok).sum()
        if need_correct:
            correct.index_copy_(0, r, ok)
        if need_dh:  # logits now hold d loss / d logits
            grad_h.index_copy_(0, r, (logits @ w).to(h.dtype))  # (t, C)
        if need_dw:
            grad_w.add_(logits.T @ hc)  # (V, C); summed over chunks in fp32
    return loss, grad_h, grad_w, correct


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk, dtype, impl):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly in _forward
            loss, grad_h, grad_w, _ = _forward(h, weight, labels, chunk, dtype, impl, need_dh, need_dw)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # The stored gradients are those of the loss itself; the chain rule only scales them (out of place, so a
        # second backward with retain_graph sees them unchanged).
        dh = grad_h * grad_loss if grad_h is not None else None  # stays in h's dtype
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy_sum(h, weight, labels, chunk=None, impl=None, return_correct=False):
    """fp32 sum of CE(h @ weight.T, labels) over labels != -100; see the module docstring.

    chunk: labelled rows per chunk (default from the vocab size, ~1 GiB of fp32 logits).
    impl: "triton" or "torch" for the row-wise pass (default: Triton on CUDA, torch elsewhere).
    return_correct (evaluation only, under torch.no_grad): (loss, correct) with correct (T,) bool, True where
    labels[t] is the first argmax of row t's logits (greedy decoding's choice); False on ignored rows.
    """
    if h.dim() != 2 or labels.shape != h.shape[:1] or weight.shape[1] != h.shape[1]:
        raise ValueError(f"expected h (T, C), weight (V, C), labels (T,); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    chunk = chunk or default_chunk(weight.shape[0])
    impl = impl or ("triton" if h.is_cuda else "torch")
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if not torch.is_grad_enabled():  # evaluation: losses only, no gradient pass
        with torch.autocast(device, enabled=False):
            loss, _, _, correct = _forward(h, weight, labels, chunk, dtype, impl, False, False, return_correct)
        return (loss, correct.bool()) if return_correct else loss
    if return_correct:
        raise ValueError("return_correct is for evaluation: call linear_cross_entropy_sum under torch.no_grad().")
    return _LinearCrossEntropySum.apply(h, weight, labels, chunk, dtype, impl)
