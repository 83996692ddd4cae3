"""Shared-backbone experts: the multi-head layer, the backbone's gradient scale, one backbone pass
per batch, per-head losses, and cRT on the frozen shared backbone (CPU, tiny models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from argse_cli.experts.losses import logit_adjusted_ce
from argse_cli.experts.shared import grad_scale, train_experts_shared
from argse_cli.experts.trainer import (
    TrainRecipe,
    load_model,
    predict_logits,
    state_dict_to_safetensors_bytes,
    train_expert,
)
from argse_cli.nn.resnet import MultiHeadLinear, cifar_resnet

torch.set_num_threads(1)
SPECS = ["ce", "balsoftmax", "logitadjust:2"]


def _toy(n_per_class, seed: int):
    """3 classes: the bright channel is the class; long-tailed counts."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)])
    x = (rng.random((len(y), 32, 32, 3)) * 80).astype(np.uint8)
    x[np.arange(len(y)), :, :, y] += 150
    return x, y.astype(np.int64)


def _recipe(**kw):
    base = dict(depth=8, epochs=2, batch_size=32, lr=0.1, warmup_epochs=0, seed=1)
    base.update(kw)
    return TrainRecipe(**base)


def test_multihead_linear_is_h_linears():
    torch.manual_seed(0)
    mh = MultiHeadLinear(4, 3, 2)
    torch.nn.init.normal_(mh.bias)
    f = torch.randn(5, 4)
    out = mh(f)
    assert out.shape == (5, 2, 3)
    for h in range(2):
        torch.testing.assert_close(out[:, h], f @ mh.weight[h].t() + mh.bias[h])
    # hand case: W_0 = I-like picks features, W_1 = 2 x that, biases (1, 2, 3) / 0
    with torch.no_grad():
        mh.weight.zero_()
        mh.weight[0, :, :3] = torch.eye(3)
        mh.weight[1, :, :3] = 2 * torch.eye(3)
        mh.bias.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    got = mh(torch.tensor([[1.0, -1.0, 0.5, 9.0]]))
    torch.testing.assert_close(got, torch.tensor([[[2.0, 1.0, 3.5], [2.0, -2.0, 1.0]]]))


def test_multihead_model_init_and_shapes():
    torch.manual_seed(0)
    m = cifar_resnet(8, 10, width=2, num_heads=4)
    assert m.feature_dim == 128 and m.fc.weight.shape == (4, 10, 128)
    assert torch.equal(m.fc.bias, torch.zeros(4, 10))
    w = m.fc.weight
    assert abs(w.std().item() - (2 / 128) ** 0.5) < 0.1 * (2 / 128) ** 0.5  # each head ~ nn.Linear init
    x = torch.randn(3, 3, 32, 32)
    assert m.eval()(x).shape == (3, 4, 10)
    with pytest.raises(ValueError):
        cifar_resnet(8, 10, width=0)


def test_grad_scale_forward_identity_backward_scaled():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.25, 0.5, 1.0]))


def test_heads_losses_one_backbone_pass_and_learning(monkeypatch):
    import argse_cli.experts.shared as sh

    x, y = _toy([80, 48, 32], seed=0)  # 160 images -> 5 steps per epoch at 32
    xt, yt = _toy([40, 40, 40], seed=1)
    counts = np.bincount(y)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    stem_calls: list[int] = []
    real = sh.cifar_resnet

    def spy(*a, **k):  # count the backbone's forward passes (its stem conv)
        m = real(*a, **k)
        m.conv1.register_forward_hook(lambda *_: stem_calls.append(1))
        return m

    monkeypatch.setattr(sh, "cifar_resnet", spy)
    steps: list[torch.Tensor] = []
    hist: list = []
    model = train_experts_shared(
        x, y, SPECS, _recipe(epochs=3), log_pi, histories=hist,
        on_step=lambda s, ld: steps.append(ld.clone()),
    )  # fmt: skip
    assert len(stem_calls) == 15  # 3 epochs x 5 steps: one backbone pass per batch for 3 heads
    assert isinstance(model.fc, MultiHeadLinear) and model.fc.num_heads == 3
    assert len(steps) == 15 and all(s.shape == (3,) for s in steps)
    assert len(hist) == 3 and all(len(h) == 3 for h in hist)
    for e in range(3):  # epoch loss = mean of that head's step losses
        assert math.isclose(hist[e][0]["loss"], float(torch.stack(steps[:5])[:, e].mean()), rel_tol=1e-5)
    lg = predict_logits(model, xt)
    assert lg.shape == (120, 3, 3)
    for e in range(3):
        acc = float((lg[:, e].argmax(1).numpy() == yt).mean())
        assert acc > 0.8, (SPECS[e], acc)  # chance = 1/3


@pytest.mark.parametrize("backbone_grad", ["sum", "mean"])
def test_head_gradient_is_its_own_loss_and_backbone_gets_the_sum_or_mean(backbone_grad):
    """Head e's gradient is exactly dL_e/dW_e (the gradient a model trained on L_e alone gets for its
    head); the backbone's is sum_e dL_e/dtheta ("sum") or (1/E) sum_e dL_e/dtheta ("mean")."""
    torch.manual_seed(0)
    C, E = 3, 3
    m = cifar_resnet(8, C, num_heads=E)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, C, (8,))
    log_pi = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    taus = torch.tensor([0.0, 1.0, 2.0])
    from argse_cli.experts.fused import logit_adjusted_ce_stacked

    f = grad_scale(m.features(x), 1 / E if backbone_grad == "mean" else 1.0)
    L = logit_adjusted_ce_stacked(m.fc(f).transpose(0, 1), y, log_pi, taus)
    L.sum().backward()
    g_head = m.fc.weight.grad.clone()
    g_conv = m.conv1.weight.grad.clone()
    for e in range(E):
        m.zero_grad()
        le = logit_adjusted_ce(m(x)[:, e], y, log_pi, float(taus[e]))
        le.backward()
        torch.testing.assert_close(g_head[e], m.fc.weight.grad[e])
        assert torch.count_nonzero(m.fc.weight.grad[[i for i in range(E) if i != e]]) == 0
    m.zero_grad()
    L = logit_adjusted_ce_stacked(m(x).transpose(0, 1), y, log_pi, taus)
    (L.mean() if backbone_grad == "mean" else L.sum()).backward()
    torch.testing.assert_close(g_conv, m.conv1.weight.grad, rtol=1e-4, atol=1e-6)


def test_refusals():
    x, y = _toy([8, 8, 8], seed=0)
    with pytest.raises(ValueError, match="decoupled"):
        train_experts_shared(x, y, ["ce", "decoupled"], _recipe(epochs=1))
    with pytest.raises(ValueError, match="distinct"):
        train_experts_shared(x, y, ["ce", "ce"], _recipe(epochs=1))
    with pytest.raises(ValueError, match="backbone_grad"):
        train_experts_shared(x, y, ["ce"], _recipe(epochs=1), backbone_grad="max")


def test_crt_head_on_the_frozen_shared_backbone():
    x, y = _toy([64, 32, 16], seed=0)
    shared = train_experts_shared(x, y, SPECS, _recipe(epochs=1))
    blob = state_dict_to_safetensors_bytes(shared)
    assert shared.fc.weight.shape == (3, 3, 64)
    crt, _ = train_expert(x, y, "decoupled", _recipe(epochs=2), init_state=blob, classifier_only=True)
    s_sh, s_crt = shared.state_dict(), crt.state_dict()
    for k, v in s_crt.items():
        if k.startswith("fc."):
            assert v.shape == ((3, 64) if k == "fc.weight" else (3,))
        else:
            assert torch.equal(v, s_sh[k]), k  # frozen backbone incl. BN statistics
    # the shared model round-trips through safetensors with its head count
    back = load_model(blob, 8, 3, num_heads=3)
    torch.testing.assert_close(predict_logits(back, x[:10]), predict_logits(shared, x[:10]))
    with pytest.raises(RuntimeError):
        load_model(blob, 8, 3)  # a single-head architecture refuses the 3-head state
