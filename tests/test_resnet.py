import pytest
import torch

from argse_cli.nn.resnet import BasicBlock, cifar_resnet

torch.set_num_threads(1)


def _n_blocks(m):
    return sum(isinstance(x, BasicBlock) for x in m.modules())


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56])
def test_depth_gives_6n_plus_2_layers(depth):
    m = cifar_resnet(depth, 10)
    n = (depth - 2) // 6
    assert _n_blocks(m) == 3 * n
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    # stem + 2 convs per block (+ fc) = depth weighted layers; option A has no shortcut convs
    assert len(convs) + 1 == depth


def test_default_depth_is_32():
    assert _n_blocks(cifar_resnet(num_classes=10)) == 15


@pytest.mark.parametrize("depth", [7, 9, 110, 0, 32.0, True])
def test_bad_depth_raises(depth):
    with pytest.raises(ValueError):
        cifar_resnet(depth, 10)


def test_shapes_features_and_fc():
    torch.manual_seed(0)
    m = cifar_resnet(8, 7).eval()
    x = torch.randn(5, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (5, 64)
    assert (f >= 0).all()  # pooled after ReLU
    assert m.fc.in_features == 64 and m.fc.out_features == 7
    assert torch.allclose(m(x), m.fc(f), atol=1e-6)


def test_option_a_shortcut_zero_pads_channels_and_subsamples():
    blk = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    sc = blk.shortcut(x)
    assert sc.shape == (2, 32, 4, 4)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2])
    assert (sc[:, :8] == 0).all() and (sc[:, 24:] == 0).all()


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    m = cifar_resnet(56, 10)
    w = m.layer3[0].conv2.weight  # 64 x 64 x 3 x 3, fan_out = 576
    assert abs(w.std().item() - (2.0 / 576) ** 0.5) < 0.1 * (2.0 / 576) ** 0.5
    assert torch.equal(m.fc.bias, torch.zeros(10))
    assert torch.equal(m.bn1.weight, torch.ones(16))
