"""The one reflect padding (sampler tiling and data transforms)."""

from __future__ import annotations

import pytest
import torch

from invsr_pl.utils.padding import reflect_pad


def test_reflect_pad_loops_beyond_the_image_size() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)
    y = reflect_pad(x, 3, 4, 5, 2)
    assert y.shape == (1, 1, 9, 10)
    assert torch.equal(y[..., 3:5, 5:8], x)
    # reflection (not replication): the row above the image mirrors the second row
    assert torch.equal(y[..., 2, 5:8], x[..., 1, :])
    with pytest.raises(ValueError, match=">= 0"):
        reflect_pad(x, -1, 0, 0, 0)


def test_reflect_pad_takes_unbatched_images() -> None:
    x = torch.rand(3, 2, 5)
    torch.testing.assert_close(
        reflect_pad(x, 1, 6, 0, 9), reflect_pad(x[None], 1, 6, 0, 9)[0], atol=0, rtol=0
    )
