import pytest
import torch
import torch.nn.functional as F

from argse_cli.experts.augment import (
    _PIXEL_OPS,
    AUG_PRESETS,
    RANDAUG_OPS,
    apply_augment,
    cutmix,
    mixup,
    rand_augment,
    random_crop_flip,
    sample_beta,
)

torch.set_num_threads(1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _imgs(b=8, dtype=torch.uint8, seed=0):
    g = _gen(seed)
    x = torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.float() / 255.0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_shape_dtype(dtype):
    x = _imgs(16, dtype)
    out = random_crop_flip(x, 4, _gen())
    assert out.shape == x.shape and out.dtype == x.dtype


def test_crop_flip_pad0_noflip_is_identity():
    x = _imgs(16)
    assert torch.equal(random_crop_flip(x, pad=0, generator=_gen(), flip_p=0.0), x)


def test_crop_flip_pad0_always_flip_mirrors():
    x = _imgs(4)
    assert torch.equal(random_crop_flip(x, pad=0, generator=_gen(), flip_p=1.0), x.flip(3))


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = _imgs(64)
    out = random_crop_flip(x, 4, _gen(3), flip_p=0.0)
    xp = F.pad(x, (4, 4, 4, 4))
    for i in range(0, 64, 7):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], xp[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert hits, f"sample {i} is not a crop of its padded image"


def test_per_sample_crops_differ_for_replicated_image():
    x = _imgs(1).repeat(64, 1, 1, 1)
    out = random_crop_flip(x, 4, _gen())
    distinct = {tuple(o.flatten()[::37].tolist()) for o in out}
    assert len(distinct) > 20  # 81 offsets x 2 flips; one random op per batch would give 1


def test_apply_augment_keeps_labels():
    x, y = _imgs(32), torch.arange(32) % 10
    for preset in ("cropflip", "none"):
        xa, ya = apply_augment(x, y, preset, 10, _gen())
        assert torch.equal(ya, y)
        assert xa.shape == x.shape and xa.dtype == torch.float32
        assert 0.0 <= xa.min() and xa.max() <= 1.0
    xa, _ = apply_augment(x, y, "none", 10, _gen())
    assert torch.allclose(xa * 255, x.float())


def test_rand_augment_dtype_and_per_sample_ops():
    x = _imgs(1).repeat(64, 1, 1, 1)
    out = rand_augment(x, n=2, m=10, generator=_gen())
    assert out.dtype == torch.uint8 and out.shape == x.shape
    distinct = {tuple(o.flatten()[::13].tolist()) for o in out}
    assert len(distinct) > 10
    xf = x.float() / 255
    outf = rand_augment(xf, n=1, m=10, generator=_gen())
    assert outf.dtype == torch.float32 and 0 <= outf.min() and outf.max() <= 1


def test_rand_augment_m0_photometric_ops_are_identity():
    # magnitude 0: blend factors = 1, posterize keeps 8 bits, affine = identity
    x = _imgs(4).float() / 255
    s = torch.zeros(4)
    for name in ("identity", "brightness", "contrast", "color", "sharpness", "posterize"):
        assert torch.allclose(_PIXEL_OPS[name](x, s), x, atol=1e-6), name
    assert len(RANDAUG_OPS) >= 14


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_mix_targets_sum_to_one_and_per_sample_lambda(fn):
    x, y = _imgs(64), torch.arange(64) % 10
    y1 = F.one_hot(y, 10).float()
    xm, ym = fn(x, y1, 0.2, _gen())
    assert xm.shape == x.shape and xm.dtype == torch.float32
    torch.testing.assert_close(ym.sum(1), torch.ones(64))
    assert (ym >= 0).all()
    lam_own = ym[torch.arange(64), y]
    assert len(set(lam_own.round(decimals=4).tolist())) > 5


def test_cutmix_lambda_equals_box_area():
    x = torch.zeros(64, 3, 32, 32)  # own image 0, partner image distinct constant
    ids = torch.arange(64).float()
    x = x + ids.view(-1, 1, 1, 1) + 1
    y1 = torch.eye(64)
    xm, ym = cutmix(x, y1, 1.0, _gen(1))
    for i in range(64):
        own = (xm[i, 0] == i + 1).float().mean()
        # own-label weight = fraction of own pixels (partner may be itself -> both 1)
        if ym[i, i] < 1 - 1e-6:
            assert ym[i, i].item() == pytest.approx(own.item(), abs=1e-6)


def test_mixup_is_convex_combination_with_partner():
    x = _imgs(16).float() / 255
    y1 = torch.eye(16)
    xm, ym = mixup(x, y1, 0.4, _gen(2))
    for i in range(16):
        lam = ym[i, i]
        j = int(torch.argmax(ym[i] - lam * y1[i])) if lam < 1 - 1e-6 else i
        torch.testing.assert_close(xm[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5, rtol=0)


def test_plan_preset_soft_targets():
    x, y = _imgs(32), torch.arange(32) % 10
    xa, ya = apply_augment(x, y, "plan", 10, _gen())
    assert ya.shape == (32, 10)
    torch.testing.assert_close(ya.sum(1), torch.ones(32))
    assert set(AUG_PRESETS) == {"cropflip", "plan", "none"}
    with pytest.raises(ValueError):
        apply_augment(x, y, "bogus", 10, _gen())


def test_beta_sampler_moments_and_reproducible():
    for a in (0.2, 1.0, 3.0):
        b = sample_beta(a, 40000, _gen(5))
        assert ((b >= 0) & (b <= 1)).all()
        assert b.mean().item() == pytest.approx(0.5, abs=0.01)
        assert b.var().item() == pytest.approx(1 / (4 * (2 * a + 1)), rel=0.05)
    assert torch.equal(sample_beta(0.2, 10, _gen(7)), sample_beta(0.2, 10, _gen(7)))


def test_same_generator_seed_same_output():
    x, y = _imgs(16), torch.arange(16) % 10
    a = apply_augment(x, y, "plan", 10, _gen(9))
    b = apply_augment(x, y, "plan", 10, _gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
