"""Sinks on rows in a data-dependent order are booked on their own sample (``engine.rows``).

Mixture-of-experts layers sort their rows by expert and gather the tokens in that order; a
sink there (an expert's bias) was booked by the unsorted layout, so the per-sample report
moved relevance between samples (gpt-oss: 98.1 / 101.9 of 100 for a batch of two)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import DLBacktrace


class SortedExperts(nn.Module):
    """Each token routed to one of three experts: rows sorted by expert (``sort``), gathered,
    each expert's weight and bias applied, then put back in token order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.router, self.head = nn.Embedding(16, 4), nn.Linear(4, 3), nn.Linear(4, 3)
        self.w, self.b = nn.Parameter(torch.randn(3, 4, 4)), nn.Parameter(torch.randn(3, 4) * 3)

    def forward(self, input_ids):
        flat = self.embed(input_ids).reshape(-1, 4)
        chosen, order = torch.sort(self.router(flat).argmax(-1))
        y = (flat[order][:, None, :] @ self.w[chosen]).squeeze(1) + self.b[chosen]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0])
        return self.head(y[inverse].reshape(input_ids.shape[0], -1, 4).mean(1))


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
def test_sinks_on_sorted_rows_stay_with_their_sample(mode):
    ids = torch.tensor([[1, 14, 3, 5, 7], [15, 2, 7, 9, 0]])
    dlb = DLBacktrace(SortedExperts().eval(), {"input_ids": ids})
    c = dlb.run_task(inputs={"input_ids": ids}, mode=mode)["conservation"]
    scale = max(100.0, float(abs(c["inputs"]).max() + abs(c["sinks"]).max()))
    assert abs(c["inputs"] + c["sinks"] - c["seed"]).max() <= 1e-5 * scale, c
    assert (abs(c["sinks"]) > 1.0).all()  # the biases' shares: sinks on the sorted rows


class TopRows(nn.Module):
    """The two largest features of each token's row ([B*T, 2] after a topk, as a router's
    top-k weights), shifted by a constant (a sink on those rows), then pooled per sample."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 4), nn.Linear(2, 3)
        self.register_buffer("shift", torch.tensor([2.0, -1.0]))

    def forward(self, input_ids):
        top = self.embed(input_ids).reshape(-1, 4).topk(2, -1).values + self.shift
        return self.head(top.reshape(input_ids.shape[0], -1, 2).mean(1))


def test_sinks_on_topk_rows_stay_with_their_sample():
    """A topk's outputs inherit the folded batch axis of its input (JetMoe's router weights:
    102.9 / 97.1 of 100 per sample, the batch's total right)."""
    ids = torch.tensor([[1, 14, 3, 5, 7], [15, 2, 7, 9, 0]])
    dlb = DLBacktrace(TopRows().eval(), {"input_ids": ids})
    c = dlb.run_task(inputs={"input_ids": ids})["conservation"]
    assert abs(c["inputs"] + c["sinks"] - c["seed"]).max() <= 1e-5 * 100.0, c
    assert (abs(c["sinks"]) > 1.0).all()  # the shift's shares: sinks on the topk rows


class CastPositions(nn.Module):
    """Sinusoidal positions as Pegasus-X builds them: ``arange(T).type_as(hidden)``, whose
    values are the arange's (``hidden`` gives only its dtype)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 4), nn.Linear(4, 3)

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1]).type_as(hidden)
        return self.head((hidden + torch.sin(positions)[:, None]).mean(1))


def test_positions_cast_to_the_data_dtype_are_a_per_sample_sink():
    """type_as's ``other`` gives its dtype only: the positions stay constants, and their share
    is booked on each sample where it meets the data (they were taken for data, their
    relevance carried to the arange and shared evenly between the samples there)."""
    ids = torch.tensor([[1, 14, 3, 5, 7], [15, 2, 7, 9, 0]])
    dlb = DLBacktrace(CastPositions().eval(), {"input_ids": ids})
    c = dlb.run_task(inputs={"input_ids": ids})["conservation"]
    assert torch.allclose(torch.as_tensor(c["inputs"] + c["sinks"]), torch.as_tensor(c["seed"]),
                          atol=1e-4)  # fmt: skip
    for row in range(2):  # each sample alone books the same sinks as in the batch
        alone = dlb.run_task(inputs={"input_ids": ids[row : row + 1]})["conservation"]
        assert abs(float(alone["sinks"][0]) - float(c["sinks"][row])) < 1e-4
