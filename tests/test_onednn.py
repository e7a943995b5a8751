"""fp32 Linear through oneDNN (the references' and pass checks' forwards): same results, other kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mvd_deploy.onednn import _linear_pointwise, onednn_linear

pytestmark = pytest.mark.skipif(_linear_pointwise() is None, reason="this torch build has no oneDNN linear op")


class _Ops(TorchDispatchMode):
    """The kernels a call reached, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _dispatched(fn) -> list[str]:
    with _Ops() as ops:
        fn()
    return ops.names


@pytest.mark.parametrize("shape", [(37, 96), (2, 45, 96)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed_weight", [False, True])  # the optimiser's folded transposes are strided
def test_linear_through_onednn_equals_torchs(shape, bias, transposed_weight):
    torch.manual_seed(0)
    x = torch.randn(shape)
    weight = torch.randn(96, 130).t() if transposed_weight else torch.randn(130, 96)
    b = torch.randn(130) if bias else None
    expected = F.linear(x, weight, b)
    with onednn_linear():
        got = F.linear(x, weight, b)
        assert _dispatched(lambda: F.linear(x, weight, b)) == ["mkldnn._linear_pointwise.default"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # |y| up to ~40: fp32 summation order
    assert "mkldnn._linear_pointwise.default" not in _dispatched(lambda: F.linear(x, weight, b))  # only inside


def test_a_module_forward_uses_it_and_other_calls_go_on_as_before():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x = torch.randn(4, 5, 32)
    with torch.no_grad():
        expected = layer(x)
        with onednn_linear():
            names = _dispatched(lambda: layer(x))
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert names.count("mkldnn._linear_pointwise.default") == 2
    with onednn_linear():
        # autograd (the op has no backward here), meta stand-ins (FLOP counts), other dtypes: torch's own
        loss = layer(x).sum()
        loss.backward()
        assert layer[0].weight.grad is not None
        meta = F.linear(torch.empty(3, 32, device="meta"), torch.empty(8, 32, device="meta"))
        assert meta.device.type == "meta" and meta.shape == (3, 8)
        half = F.linear(x.double(), layer[0].weight.double().detach(), None)
        assert half.dtype == torch.float64
        assert "mkldnn._linear_pointwise.default" not in _dispatched(
            lambda: F.linear(x.double(), layer[0].weight.double().detach(), None)
        )
