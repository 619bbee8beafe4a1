"""Muon: momentum orthogonalised by Newton-Schulz, for the hidden layers' matrices.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024); Liu et al.,
"Muon is Scalable for LLM Training" (2025). For a weight matrix W with gradient G:

    B <- mu B + G                          momentum
    M  = G + mu B   (Nesterov)             or B
    O  = NS(M) ~ U V^T  where M = U S V^T  the nearest semi-orthogonal matrix
    W <- (1 - lr wd) W - lr sqrt(max(1, rows / cols)) O

NS is the Newton-Schulz iteration X <- a X + b (X X^T) X + c (X X^T)^2 X on X_0 = M / ||M||_F,
which drives every singular value towards 1 while keeping the singular vectors. The classic
cubic coefficients (1.5, -0.5, 0) converge to U V^T exactly; Muon's quintic (3.4445, -4.7750,
2.0315) gets singular values into about [0.7, 1.2] in 5 steps, which is what the update needs.
Embeddings, the output head, norms and biases are not hidden matrices: they take AdamW steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

QUINTIC = (3.4445, -4.7750, 2.0315)
CUBIC = (1.5, -0.5, 0.0)


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T of a matrix (or a batch of matrices) g = U S V^T, iterated in ``dtype``
    (default: fp32, or g's own fp64; Muon passes bf16 where the run computes in bf16, as its authors do)."""
    a, b, c = coefficients
    x = g.to(dtype or (torch.float64 if g.dtype == torch.float64 else torch.float32))
    wide = x.shape[-2] > x.shape[-1]
    if wide:
        x = x.mT  # iterate on the side with fewer rows: X X^T is then the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return (x.mT if wide else x).to(g.dtype)


def split_for_muon(groups: list[dict], cfg) -> list[dict]:
    """Each group split into its hidden matrices (Muon, lr train.muon_lr scaled like the group) and
    the rest (AdamW). Which tensors are embeddings or the head comes from the ``_muon_excluded``
    set the trainer marks on the parameters (nn.Embedding weights and the output head)."""
    out = []
    for g in groups:
        hidden = [p for p in g["params"] if p.dim() == 2 and not getattr(p, "_muon_excluded", False)]
        rest = [p for p in g["params"] if not (p.dim() == 2 and not getattr(p, "_muon_excluded", False))]
        scale = g["initial_lr"] / cfg.lr
        base = {k: v for k, v in g.items() if k != "params"}
        if hidden:
            peak = cfg.muon_lr * scale
            out.append({**base, "params": hidden, "use_muon": True, "lr": peak, "initial_lr": peak})
        if rest:
            out.append({**base, "params": rest, "use_muon": False})
    return out


def mark_non_hidden(model: nn.Module) -> None:
    """Flag embedding tables and the output head so that Muon leaves them to AdamW."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight._muon_excluded = True
    head = getattr(model, "lm_head", None) or getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        head.weight._muon_excluded = True


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon``, AdamW (decoupled decay, bias-corrected) for the others."""

    def __init__(self, groups: list[dict], *, betas=(0.9, 0.95), momentum: float = 0.95, eps: float = 1e-8, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=1e-3, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0, use_muon=False)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        """Matrices of one shape are orthogonalised together (one batched Newton-Schulz)."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape, ps in by_shape.items():
            grads = [p.grad for p in ps]
            bufs = []
            for p in ps:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)
            update = newton_schulz(torch.stack(nesterov), group["ns_steps"], dtype=self.ns_dtype).to(ps[0].dtype)
            torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, list(update.unbind(0)), alpha=-lr * math.sqrt(max(1.0, shape[0] / shape[1])))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch's own AdamW arithmetic (decoupled decay, bias correction; foreach kernels)."""
        from torch.optim.adam import adam

        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        b1, b2 = group["betas"]
        adam(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, foreach=True, decoupled_weight_decay=True,
             amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
