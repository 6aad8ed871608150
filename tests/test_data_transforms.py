"""agr_optim.data.transforms: the authors' augmentation on a batch, against numpy references.

Not testable on CPU: that augmentation never synchronises with the host on an accelerator (no
``.item()`` and no data-dependent Python branch; checked by reading)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data_files import gen

from agr_optim.data import augment, authors_cutout, cutout, random_crop, random_flip


def positive_batch(n: int = 64, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Distinct values in (0, 1]: a zero can only come from padding or cutout."""
    return torch.rand(n, c, size, size, generator=gen(seed)) * 0.9 + 0.1


def test_random_crop_is_a_translation_of_the_zero_padded_image() -> None:
    x, p = positive_batch(), 2
    out = random_crop(x, p, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)))  # numpy reference, zeros
    offsets = []
    for n in range(len(x)):
        matches = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)
                   if np.array_equal(out[n].numpy(), padded[n, :, i : i + 8, j : j + 8])]
        assert len(matches) == 1, f"image {n} is not one crop of its padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # 25 possible offsets, 64 images: the draws vary
    assert {i for i, _ in offsets} == set(range(2 * p + 1)) == {j for _, j in offsets}
    assert random_crop(x, 0, gen()) is x


def test_random_flip_mirrors_about_half() -> None:
    x = positive_batch()
    out = random_flip(x, gen(2))
    flipped = [np.array_equal(o, xi[..., ::-1]) for o, xi in zip(out.numpy(), x.numpy(), strict=True)]
    kept = [np.array_equal(o, xi) for o, xi in zip(out.numpy(), x.numpy(), strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image: one or the other
    assert 16 < sum(flipped) < 48


def spans(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return (rows.min(), rows.max() + 1), (cols.min(), cols.max() + 1)


@pytest.mark.parametrize("length", [3, 4])
def test_cutout_zeroes_one_clipped_square(length: int) -> None:
    x = positive_batch(n=300, c=2, size=8)
    out = cutout(x, length, gen(3)).numpy()
    zero = out == 0
    assert np.array_equal(zero[:, 0], zero[:, 1])  # every channel
    np.testing.assert_array_equal(out[~zero], x.numpy()[~zero])  # the rest untouched
    clipped = 0
    for n in range(len(out)):
        mask = zero[n, 0]
        (r0, r1), (c0, c1) = spans(mask)
        assert mask[r0:r1, c0:c1].all() and mask.sum() == (r1 - r0) * (c1 - c0)  # one filled rectangle
        # It is [cy - L//2, cy - L//2 + L) clipped to the image, for a centre cy inside the image.
        for lo, hi in ((r0, r1), (c0, c1)):
            starts = [cy - length // 2 for cy in range(8)]
            assert (lo, hi) in {(max(0, s), min(8, s + length)) for s in starts}, (n, lo, hi)
        clipped += (r1 - r0, c1 - c0) != (length, length)
    assert 0 < clipped < len(out)  # some squares cross a border, some do not


def test_authors_cutout_is_torchtoolbox_rectangle_pasted_as_pil_does() -> None:
    x = positive_batch(n=2000, c=3, size=32, seed=4)
    out = authors_cutout(x, gen(5)).numpy()
    erased = out[:, 1] != x.numpy()[:, 1]  # Pillow pastes (c, 0, 0): the second channel becomes 0
    counts = erased.reshape(len(out), -1).sum(1)
    assert 850 < (counts > 0).sum() < 1150  # p = 0.5
    for n in np.nonzero(counts)[0]:
        (r0, r1), (c0, c1) = spans(erased[n])
        h, w = r1 - r0, c1 - c0
        assert erased[n, r0:r1, c0:c1].all() and counts[n] == h * w
        box = out[n, :, r0:r1, c0:c1]
        assert (box[1:] == 0).all() and (box[0] == box[0, 0, 0]).all()
        level = box[0, 0, 0] * 255
        assert abs(level - round(level)) < 1e-4 and 0 <= round(level) <= 255
        # h = floor(sqrt(s r HW)), w = floor(sqrt(s HW / r)) for s in [0.02, 0.4], r in [0.4, 2.5]
        assert h * w <= 0.4 * 1024 and (h + 1) * (w + 1) > 0.02 * 1024
        assert h / (w + 1) < 2.5 and (h + 1) / w > 0.4
    untouched = counts == 0
    np.testing.assert_array_equal(out[untouched], x.numpy()[untouched])
    # The distribution against torchtoolbox's get_params, simulated here in numpy (200k draws):
    # s ~ U(0.02, 0.4) * H W, r ~ U(0.4, 2.5), w = int(sqrt(s / r)), h = int(sqrt(s r)),
    # left ~ randint(0, W - w), top ~ randint(0, H - h) (inclusive), value ~ randint(0, 255).
    rng = np.random.default_rng(0)
    area, r = rng.uniform(0.02, 0.4, 200_000) * 1024, rng.uniform(0.4, 2.5, 200_000)
    ref_h, ref_w = np.sqrt(area * r).astype(int), np.sqrt(area / r).astype(int)
    ref_top = rng.integers(0, 32 - ref_h + 1)
    boxes = np.array([(*(lambda s: (s[0][1] - s[0][0], s[1][1] - s[1][0], s[0][0]))(spans(erased[n])),
                       out[n, 0][erased[n]][0] * 255) for n in np.nonzero(counts)[0]])
    for got, ref, name in ((boxes[:, 0], ref_h, "rows"), (boxes[:, 1], ref_w, "cols"), (boxes[:, 2], ref_top, "top"),
                           (boxes[:, 3], rng.integers(0, 256, 200_000), "value")):
        se = ref.std() / np.sqrt(len(got))
        assert abs(got.mean() - ref.mean()) < 4 * se, (name, got.mean(), ref.mean(), se)
    assert boxes[:, 0].mean() > boxes[:, 1].mean() + 2  # rows = sqrt(s r): taller than wide on average
    gray = authors_cutout(positive_batch(n=200, c=1, size=16), gen(6)).numpy()
    levels = gray[gray != positive_batch(n=200, c=1, size=16).numpy()] * 255
    assert len(levels) and np.allclose(levels, np.round(levels), atol=1e-4)


def test_augment_draws_crop_flip_cutout_in_order_and_is_reproducible() -> None:
    x = positive_batch(n=16, size=12)
    out = augment(x, padding=2, flip=True, cutout=5, generator=gen(7))
    g = gen(7)
    step = cutout(random_flip(random_crop(x, 2, g), g), 5, g)
    assert torch.equal(out, step)
    assert torch.equal(augment(x, padding=2, flip=True, cutout=5, generator=gen(7)), out)
    assert not torch.equal(augment(x, padding=2, flip=True, cutout=5, generator=gen(8)), out)
    g = gen(9)
    want = authors_cutout(random_flip(random_crop(x, 4, g), g), g)
    assert torch.equal(augment(x, cutout="authors", generator=gen(9)), want)
    assert augment(x, padding=0, flip=False, cutout=None, generator=gen()) is x


def test_augmentation_keeps_channels_last() -> None:
    x = positive_batch(n=8, size=12)
    xl = x.contiguous(memory_format=torch.channels_last)
    for fn in (lambda t, g: augment(t, cutout=3, generator=g), lambda t, g: authors_cutout(t, g)):
        out = fn(xl, gen(1))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, fn(x, gen(1)))
        assert fn(x, gen(1)).is_contiguous()


def test_augmentation_arguments_are_checked() -> None:
    x = positive_batch(n=2)
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator"):
        augment(x, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"generator is on cpu but the batch is on meta"):
        random_flip(torch.empty(2, 3, 8, 8, device="meta"), gen())
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \[N, C, H, W\]"):
        random_crop(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4, gen())
    for bad in (0, "Authors", True, 2.5):
        with pytest.raises(ValueError, match=r"cutout must be None, 'authors' or a square side >= 1"):
            augment(x, cutout=bad, generator=gen())
    with pytest.raises(ValueError, match=r"padding must be an integer >= 0"):
        augment(x, padding=-1, generator=gen())
    with pytest.raises(ValueError, match=r"p must be a probability"):
        authors_cutout(x, gen(), p=2.0)

