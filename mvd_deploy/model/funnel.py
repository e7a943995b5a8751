"""Channel funnels: a learned reduction of the inner width between two affine layers.

A funnel pair sits between ``to_q`` and ``to_k`` (the similarity map only needs q·kᵀ) and between
``to_v`` and ``to_out`` (the value path is linear up to the output projection). In train-time form
each side is a :class:`FunnelLinear` — the original projection plus a funnel matrix — so the
checkpoint keeps diffusers' parameter names (``to_q.weight``) and adds ``to_q.funnel``. The deploy
pass ``merge_funnels`` replaces each by one ``nn.Linear`` whose weight is a plain matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunnelLinear(nn.Linear):
    """``nn.Linear`` with a funnel on its output side (``to_q/to_k/to_v``) or input side (``to_out``).

    side="output": y = F · (W x + b),   F: (inner, out_features)   merged W' = F W, b' = F b
    side="input":  y = W · (G x) + b,   G: (in_features, inner)    merged W' = W G
    """

    def __init__(self, in_features: int, out_features: int, inner: int, side: str, bias: bool, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        self.side = side
        shape = (inner, out_features) if side == "output" else (in_features, inner)
        self.funnel = nn.Parameter(torch.empty(shape, device=device))

    @classmethod
    def wrap(cls, linear: nn.Linear, inner: int, side: str) -> FunnelLinear:
        """A FunnelLinear sharing ``linear``'s weight and bias (funnel left uninitialised)."""
        out = cls(
            linear.in_features, linear.out_features, inner, side, linear.bias is not None, device=linear.weight.device
        )
        out.weight = linear.weight
        if linear.bias is not None:
            out.bias = linear.bias
        return out.to(linear.weight.dtype)

    @property
    def inner(self) -> int:
        return self.funnel.shape[0] if self.side == "output" else self.funnel.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "output":
            return F.linear(F.linear(x, self.weight, self.bias), self.funnel)
        return F.linear(F.linear(x, self.funnel), self.weight, self.bias)

    def merged(self) -> nn.Linear:
        """The equivalent plain ``nn.Linear`` at the reduced width."""
        with torch.no_grad():
            if self.side == "output":
                weight = self.funnel @ self.weight
                bias = self.funnel @ self.bias if self.bias is not None else None
            else:
                weight, bias = self.weight @ self.funnel, self.bias
        out = nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inner={self.inner}, side={self.side}"


def funnel_inner_width(width: int, heads: int, fun_factor: float) -> int:
    """round(r × width), kept a whole number of channels per head (at least one)."""
    return heads * max(1, round(fun_factor * width / heads))


def coupled_singular_init(x: torch.Tensor, y: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Funnels (Fx, Fy), each (inner, d), with (Fx·x)ᵀ(Fy·y) the best rank-``inner`` approximation of xᵀy.

    x: (d, n1) and y: (d, n2) are the two weights a funnel pair sits between, viewed so that their
    product is xᵀy (for q/k: W_q and W_k of one head; for v/out: W_outᵀ and W_v of one head).
    With QR factors xᵀ = Qx·Rx, yᵀ = Qy·Ry: xᵀy = Qx (Rx Ryᵀ) Qyᵀ, so truncating the SVD of the small
    d×d matrix Rx·Ryᵀ = U S Vᵀ gives Fx = S½ Ukᵀ Rx⁻ᵀ and Fy = S½ Vkᵀ Ry⁻ᵀ. With inner = d this is
    exact (FxᵀFy = I). Computed in float64; returned in x's dtype.
    """
    dtype = x.dtype
    x64, y64 = x.double(), y.double()
    _, rx = torch.linalg.qr(x64.T)  # (d, d)
    _, ry = torch.linalg.qr(y64.T)
    u, s, vh = torch.linalg.svd(rx @ ry.T)
    root = s[:inner].sqrt()
    # Rx⁻ᵀ via a pseudo-inverse: a rank-deficient weight (e.g. zero-initialised) still gives finite funnels.
    fx = (root[:, None] * u[:, :inner].T) @ torch.linalg.pinv(rx).T
    fy = (root[:, None] * vh[:inner]) @ torch.linalg.pinv(ry).T
    return fx.to(dtype), fy.to(dtype)


def add_funnels(attn: nn.Module, fun_factor: float) -> None:
    """Turn a diffusers ``Attention``'s projections into funnelled ones (funnels uninitialised)."""
    width = attn.to_q.out_features
    inner = funnel_inner_width(width, attn.heads, fun_factor)
    attn.to_q = FunnelLinear.wrap(attn.to_q, inner, "output")
    attn.to_k = FunnelLinear.wrap(attn.to_k, inner, "output")
    attn.to_v = FunnelLinear.wrap(attn.to_v, inner, "output")
    attn.to_out[0] = FunnelLinear.wrap(attn.to_out[0], inner, "input")


@torch.no_grad()
def init_funnels_csi(attn: nn.Module) -> None:
    """Coupled singular initialisation, head by head, so each head keeps its own best approximation.

    SDPA scales logits by 1/√head_dim; a funnelled head is narrower, so the q funnel also carries
    √(d'/d) to keep the logits of the original head.
    """
    heads = attn.heads
    width = attn.to_q.out_features
    d, inner = width // heads, attn.to_q.inner
    k = inner // heads
    scale = (k / d) ** 0.5
    fq = torch.zeros(inner, width, dtype=torch.float64)
    fk, fv = torch.zeros_like(fq), torch.zeros_like(fq)
    g = torch.zeros(width, inner, dtype=torch.float64)
    wo = attn.to_out[0].weight.double()
    for h in range(heads):
        rows, cols = slice(h * d, (h + 1) * d), slice(h * k, (h + 1) * k)
        q_f, k_f = coupled_singular_init(attn.to_q.weight[rows].double(), attn.to_k.weight[rows].double(), k)
        fq[cols, rows], fk[cols, rows] = q_f * scale, k_f
        o_f, v_f = coupled_singular_init(wo[:, rows].T, attn.to_v.weight[rows].double(), k)
        g[rows, cols], fv[cols, rows] = o_f.T, v_f
    dtype = attn.to_q.weight.dtype
    attn.to_q.funnel.copy_(fq.to(dtype))
    attn.to_k.funnel.copy_(fk.to(dtype))
    attn.to_v.funnel.copy_(fv.to(dtype))
    attn.to_out[0].funnel.copy_(g.to(dtype))
