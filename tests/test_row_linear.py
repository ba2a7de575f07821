"""Task heads and adapter projections give each row the bits it gets in any other position of its batch."""
import pytest
import torch
from torch import nn

from continual_mem.row_linear import MIN_OUT, RowLinear


@pytest.mark.parametrize("out_features", [1, 2, 3, 4, 10])
def test_a_rows_bits_do_not_depend_on_its_position(out_features):
    torch.manual_seed(0)
    layer = RowLinear(48, out_features)
    with torch.no_grad():
        for rows in (2, 3, 5, 6, 7, 9, 33):
            x = torch.randn(rows, 48)
            order = torch.randperm(rows)
            assert torch.equal(layer(x)[order], layer(x[order])), rows


def test_it_is_nn_linear_where_that_is_already_safe_and_trains_the_same_parameters():
    torch.manual_seed(0)
    wide, narrow = RowLinear(48, MIN_OUT), RowLinear(48, 2)
    plain = nn.Linear(48, MIN_OUT)
    plain.load_state_dict(wide.state_dict())
    x = torch.randn(7, 48)
    assert torch.equal(wide(x), plain(x))  # bit for bit: stored tasks' outputs are unchanged
    assert set(narrow.state_dict()) == {"weight", "bias"} and narrow(x).shape == (7, 2)
    narrow(x).sum().backward()
    assert narrow.weight.grad.shape == (2, 48) and narrow.bias.grad.abs().sum() > 0
    torch.testing.assert_close(narrow(x), x @ narrow.weight.T + narrow.bias)
