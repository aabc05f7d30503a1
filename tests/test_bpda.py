import pytest
import torch

from realtime.attacks import DefendedModel, bpda


def quantise(x):                      # piecewise constant: autograd gives zero / no gradient
    return (x * 4).round() / 4


def test_forward_is_the_real_step_and_backward_the_approximation():
    x = torch.rand(2, 3, 5, 5, requires_grad=True)
    y = bpda(quantise)(x)
    assert torch.equal(y, quantise(x.detach()))
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0).expand(2, 3, 5, 5))     # straight-through
    x2 = x.detach().clone().requires_grad_(True)
    bpda(quantise, approx=lambda t: 2 * t)(x2).sum().backward()
    assert torch.allclose(x2.grad, torch.full_like(x2, 2.0))


def test_shape_changing_step_is_refused():
    with pytest.raises(ValueError, match="shape"):
        bpda(lambda t: t[..., :2])(torch.rand(1, 3, 4, 4))


def test_gradient_reaches_the_input_through_a_defended_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    attacked = DefendedModel(net, bpda(quantise))
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    attacked(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    plain = torch.rand(1, 3, 8, 8, requires_grad=True)
    net(quantise(plain)).sum().backward()
    assert plain.grad.abs().sum() == 0                                   # why BPDA is needed
