"""Distillation loss over the vocabulary without a ``[batch, seq, vocab]`` fp32 tensor.

``KL(teacher || student)`` on the next-token distributions plus LM cross-entropy, computed from
the final hidden states chunk by chunk: each chunk's student and teacher logits are formed,
the loss and its gradient with respect to the student's logits are taken in closed form
(``d/dz [a KL(p || softmax z) + b CE(z, y)] = (a + b) softmax(z) - a p - b onehot(y)``), and only
the gradients with respect to the hidden states and the output weight are kept. Peak memory is
one chunk of logits, whatever the sequence length and vocabulary (the same idea as fused
linear cross-entropy kernels). Written here because no dependency we use offers it for KL.
"""

from __future__ import annotations

from typing import Any

import torch


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = torch.nn.functional.linear(h.to(w.dtype), w, b).float()
    if softcap:
        t = torch.tanh(z / softcap)
        return t * softcap, t
    return z, None


class _FusedDistill(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, th: Any, tw: torch.Tensor | None,
        tb: torch.Tensor | None, labels: torch.Tensor, kl_weight: float, ce_weight: float,
        softcap: float | None, t_softcap: float | None, chunk: int, stats: dict[str, float],
    ) -> torch.Tensor:
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        valid = labels >= 0
        n_ce = max(int(valid.sum()), 1)
        kl_sum = torch.zeros((), dtype=torch.float64, device=h.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            with torch.no_grad():
                z, tz = _logits(h[lo:hi], w, b, softcap)
                logp = torch.log_softmax(z, dim=-1)
                if isinstance(th, SparseTargets):  # cached top-k teacher log-probs + tail mass
                    kl_c, p_t = th.kl_and_target(lo, hi, logp)
                    kl_sum += kl_c
                else:
                    t_logp = torch.log_softmax(_logits(th[lo:hi], tw, tb, t_softcap)[0], dim=-1)
                    p_t = t_logp.exp()
                    kl_sum += (p_t * (t_logp - logp)).sum().double()
                y = labels[lo:hi]
                ok = y >= 0
                ce_sum += -(logp[ok].gather(-1, y[ok, None])).sum().double()
                if need_h or need_w or need_b:
                    p = logp.exp()
                    g = (kl_weight / n) * (p - p_t)
                    g[ok] += (ce_weight / n_ce) * p[ok]
                    g[ok] = g[ok].scatter_add(-1, y[ok, None], torch.full((int(ok.sum()), 1), -ce_weight / n_ce, device=g.device))
                    if tz is not None:
                        g = g * (1 - tz * tz)
                    if need_h:
                        grad_h[lo:hi] = (g.to(w.dtype) @ w).to(h.dtype)
                    if need_w:
                        grad_w += g.T @ h[lo:hi].float()
                    if need_b:
                        grad_b += g.sum(0)
        kl = float(kl_sum) / max(n, 1)
        ce = float(ce_sum) / n_ce
        stats["kl"], stats["ce"] = kl, ce
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.w_dtype = w.dtype
        ctx.h_dtype = h.dtype
        return torch.tensor(kl_weight * kl + ce_weight * ce, dtype=torch.float32, device=h.device)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        gh = gw = gb = None
        if ctx.has[0]:
            gh = (saved.pop(0) * grad_out).to(ctx.h_dtype)
        if ctx.has[1]:
            gw = (saved.pop(0) * grad_out).to(ctx.w_dtype)
        if ctx.has[2]:
            gb = (saved.pop(0) * grad_out).to(ctx.w_dtype)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


class SparseTargets:
    """The teacher's next-token distributions kept as their top-``k`` log-probabilities plus the
    log of the mass outside them (:mod:`moefy.training.teacher_cache`), flattened ``[n, k]``.

    With ``K`` the top-k set and ``T`` the rest, ``KL = sum_K p_i (log p_i - log q_i) + p_T (log
    p_T - log q_T)``, ``q_T`` the student's mass on ``T``; its gradient in the student's logits is
    ``q - p~`` with ``p~ = p`` on ``K`` and ``p_T q_j / q_T`` on ``T`` (the tail shaped like the
    student's own).  With ``k`` the whole vocabulary ``p_T = 0`` and this is the exact KL."""

    def __init__(self, idx: torch.Tensor, logp: torch.Tensor, log_tail: torch.Tensor) -> None:
        self.idx, self.logp, self.log_tail = idx, logp, log_tail

    def kl_and_target(self, lo: int, hi: int, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's summed KL (float64) and the dense target ``p~`` ``[hi - lo, vocab]``."""
        idx = self.idx[lo:hi].to(logq.device, torch.long)
        lp = self.logp[lo:hi].to(logq.device, torch.float32)
        lt = self.log_tail[lo:hi].to(logq.device, torch.float32)
        pk = lp.exp()
        off = logq.scatter(-1, idx, float("-inf"))  # the student's log-probs outside K
        log_qt = torch.logsumexp(off, dim=-1)
        has_tail = torch.isfinite(lt) & torch.isfinite(log_qt)
        kl = (pk * (lp - logq.gather(-1, idx))).sum(-1)
        kl = kl + torch.where(has_tail, lt.exp() * (lt - log_qt), torch.zeros_like(lt))
        scale = torch.where(has_tail, lt - log_qt, torch.full_like(lt, float("-inf")))
        target = (off + scale[:, None]).exp()
        target = target.scatter(-1, idx, pk)
        return kl.sum().double(), target


def distill_loss_cached(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: SparseTargets, labels: torch.Tensor,
    kl_weight: float = 1.0, ce_weight: float = 0.0, softcap: float | None = None, chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`distill_loss` against cached top-k teacher distributions instead of a live teacher."""
    stats: dict[str, float] = {}
    loss = _FusedDistill.apply(h, w, b, targets, None, None, labels, float(kl_weight), float(ce_weight), softcap, None,
                               int(chunk), stats)
    return loss, stats


def distill_loss(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, teacher_h: torch.Tensor, teacher_w: torch.Tensor,
    teacher_b: torch.Tensor | None, labels: torch.Tensor, kl_weight: float = 1.0, ce_weight: float = 0.0,
    softcap: float | None = None, teacher_softcap: float | None = None, chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kl_weight * mean KL + ce_weight * mean CE`` from flattened hidden states ``[n, d]``
    (student ``h``, teacher ``teacher_h``) and output layers; ``labels`` is ``-100`` where no
    next token exists. Returns the loss (differentiable in ``h``, ``w``, ``b``) and the plain
    KL and CE values."""
    stats: dict[str, float] = {}
    loss = _FusedDistill.apply(
        h, w, b, teacher_h.detach(), teacher_w.detach(), None if teacher_b is None else teacher_b.detach(),
        labels, float(kl_weight), float(ce_weight), softcap, teacher_softcap, int(chunk), stats,
    )
    return loss, stats


def reference_distill_loss(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, teacher_h: torch.Tensor, teacher_w: torch.Tensor,
    teacher_b: torch.Tensor | None, labels: torch.Tensor, kl_weight: float = 1.0, ce_weight: float = 0.0,
    softcap: float | None = None, teacher_softcap: float | None = None,
) -> torch.Tensor:
    """The same loss through autograd over full logits (for tests)."""
    z = torch.nn.functional.linear(h, w, b).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    tz = torch.nn.functional.linear(teacher_h, teacher_w, teacher_b).float()
    if teacher_softcap:
        tz = torch.tanh(tz / teacher_softcap) * teacher_softcap
    t_logp = torch.log_softmax(tz, -1)
    logp = torch.log_softmax(z, -1)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
    ok = labels >= 0
    ce = torch.nn.functional.cross_entropy(z[ok], labels[ok]) if ok.any() else z.sum() * 0
    return kl_weight * kl + ce_weight * ce
