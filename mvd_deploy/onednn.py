"""fp32 ``Linear`` through oneDNN for the PyTorch forwards the toolchain checks with.

PyTorch sends an fp32 ``F.linear`` on CPU to MKL's sgemm, which runs its AVX2 code on AMD CPUs: 184-221
GFLOP/s on the UNet's shapes on a 2-core AVX-512 EPYC, where oneDNN (already torch's convolution
library) reaches 323-456 (issue 13). Inside :func:`onednn_linear`, such a call goes to oneDNN's linear
kernel instead: the same fp32 products, summed in another order (the full-size UNet's output 139 dB
apart; its reference forward 20.9 → 15.4 s).

Used for the references and pass checks (export, deploy), not for the eager baseline the benchmarks
compare with: that one is PyTorch as its users run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _linear_pointwise():
    """oneDNN's linear op (torch's inductor uses it on CPU), or None in a torch build without it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class _OneDNNLinear(TorchFunctionMode):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            tensors = [t for t in (x, weight, bias) if t is not None]
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)  # no backward here
            if not grad and x.dim() in (2, 3) and all(_plain_fp32(t) for t in tensors):
                return self.op(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def _plain_fp32(t: torch.Tensor) -> bool:
    """A dense fp32 CPU tensor or parameter, not a subclass (fake, functional) that tracers pass around."""
    plain = type(t) in (torch.Tensor, torch.nn.Parameter)
    return plain and t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided


@contextlib.contextmanager
def onednn_linear() -> Iterator[None]:
    """Within it, on this thread (torch's function modes are per thread), every fp32 CPU ``F.linear``
    runs through oneDNN; anything else (other dtypes and devices, meta tensors, autograd) as before."""
    op = _linear_pointwise()
    if op is None:
        yield
        return
    with _OneDNNLinear(op):
        yield
