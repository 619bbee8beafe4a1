"""GPTQ (Frantar et al. 2023): round a linear layer's weight one input column at a time and push each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the
layer's squared output error on calibration inputs.

For inputs X (n, in) the layer's error ||X W^T - X Q^T||^2 has Hessian H = 2 X^T X (in, in). With
U the upper Cholesky factor of H^-1 (H dampened by ``damp`` x its mean diagonal), column i is
rounded on the min-max grid (grids.asymmetric: b bits, a zero point per row and group, the group's
grid fixed when the column that opens it comes up, from the weights as updated so far), and

    err = (w_i - q_i) / U_ii,     W[:, j] -= err U_ij  for the columns j > i.

Columns are handled in blocks of ``block`` (lazy batch updates: the rest of the matrix is updated
once per block); ``act_order`` takes the columns by decreasing H_ii (the most used inputs first,
their errors spread over more columns) and puts them back in place. Inputs never seen (H_ii = 0)
get weight 0. Round-to-nearest on the same grid is GPTQ with no error feedback: the tests compare
the two on the calibration data.
"""

from __future__ import annotations

import torch

from adl_cli.quantization.grids import Quantized, asymmetric_params, round_to


class Hessian:
    """Running H = (2 / n) sum_x x x^T over calibration rows x (in,)."""

    def __init__(self, width: int):
        self.h = torch.zeros(width, width, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        total = self.n + x.shape[0]
        self.h *= self.n / total
        self.h += (2.0 / total) * x.T @ x
        self.n = total


def gptq(w: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int = 128, block: int = 128, damp: float = 0.01,
         act_order: bool = False) -> Quantized:
    """``w`` (out, in) quantized with error feedback under ``hessian`` (in, in)."""
    out, width = w.shape
    g = group_size or width
    if width % g:
        raise ValueError(f"the group size {group_size} does not divide the input width {width}")
    if hessian.shape != (width, width):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the layer reads {width} inputs")
    W = w.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(width)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(width, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    n_groups = width // g
    scale = torch.zeros(out, n_groups, dtype=torch.float64)
    zero = torch.zeros(out, n_groups, dtype=torch.float64)
    done = torch.zeros(n_groups, dtype=torch.bool)
    for i1 in range(0, width, block):
        i2 = min(i1 + block, width)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the column's place in the layer: its group
            grp = col // g
            if not done[grp]:  # the group's grid, from its weights as updated so far
                members = (perm // g == grp).nonzero().squeeze(1)
                current = torch.cat([W[:, :i1], W1, W[:, i2:]], 1)[:, members]
                scale[:, grp], zero[:, grp] = asymmetric_params(current, bits)
                done[grp] = True
            wcol = W1[:, i]
            q = round_to(wcol, scale[:, grp], zero[:, grp], bits)
            Q[:, i1 + i] = q
            err = (wcol - (q - zero[:, grp]) * scale[:, grp]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inverse = torch.argsort(perm)
    q = Q[:, inverse].to(torch.uint8)
    return Quantized(q, scale.float(), zero.float(), group_size, bits)
