"""``scatter_reduce``: elements pooled into groups (BLT pools its bytes' states into patches
with "amax"), each group's relevance shared over the elements it reduced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import DLBacktrace

B, D, GROUPS = 2, 8, 4
GROUP = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
MULTIPLIER = 100.0


class Pooled(nn.Module):
    """x [B, 8] scaled, pooled into 4 groups by ``reduce``, then a linear head; with
    ``include_self`` the groups start from the first four features (data), else from zeros."""

    def __init__(self, reduce: str, include_self: bool):
        super().__init__()
        self.reduce, self.include_self = reduce, include_self
        torch.manual_seed(0)
        self.scale = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(GROUPS, 3)

    def forward(self, x):
        start = x[:, :GROUPS] if self.include_self else x.new_zeros(x.shape[0], GROUPS)
        index = GROUP.expand(x.shape[0], -1)
        pooled = start.scatter_reduce(
            1, index, x * self.scale, self.reduce, include_self=self.include_self
        )
        return self.head(pooled)


def _x(seed: int) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("reduce", ["sum", "mean", "amax", "amin", "prod"])
def test_scatter_reduce_is_conserved_and_equals_eager(reduce, include_self, mode):
    model = Pooled(reduce, include_self).eval()
    dlb = DLBacktrace(model, {"x": _x(0)})
    x = _x(1)
    result = dlb.run_task(inputs={"x": x}, mode=mode, multiplier=MULTIPLIER)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(result["predictions"]), model(x))
    c = {k: torch.as_tensor(v).double() for k, v in result["conservation"].items()}
    torch.testing.assert_close(c["inputs"] + c["sinks"], c["seed"], rtol=0, atol=1e-4 * MULTIPLIER)
    assert (c["inputs"].abs() > 1.0).all(), c


def test_amax_gives_a_group_relevance_to_its_maximum_only():
    model = Pooled("amax", include_self=False).eval()
    x = _x(1)
    relevance = DLBacktrace(model, {"x": x}).run_task(inputs={"x": x})["relevance"]["x"]
    scaled = x * model.scale.detach()
    maximum = torch.zeros(B, GROUPS).scatter_reduce(1, GROUP.expand(B, -1), scaled, "amax",
                                                     include_self=False)  # fmt: skip
    winner = scaled == maximum.gather(1, GROUP.expand(B, -1))
    assert (relevance[~winner] == 0).all()
    assert (relevance[winner] != 0).all()
