from __future__ import annotations

import pytest
import torch
from torch import nn

from adarevd.reversible import ALPHA_MIN, Column, run_columns
from tests.conftest import randomize

WIDTH = 4


def make_stack(n: int, device: torch.device) -> tuple[list[Column], list[nn.Module]]:
    torch.manual_seed(n)
    columns = [randomize(Column(WIDTH), seed=10 + i).to(device) for i in range(n)]
    heads = [randomize(nn.Sequential(nn.Conv2d(WIDTH, 3, 3, padding=1)), seed=20 + i).to(device) for i in range(n)]
    return columns, heads


def make_inputs(device: torch.device, size: int = 32, batch: int = 2) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 16 * WIDTH, size // 16, size // 16, generator=g)
    state = tuple(
        torch.randn(batch, WIDTH * 2 ** (3 - j), size // 2 ** (3 - j), size // 2 ** (3 - j), generator=g)
        for j in range(4)
    )
    return x.to(device), tuple(t.to(device) for t in state)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_inverse_rebuilds_the_column_input(device: torch.device) -> None:
    (column,), _ = make_stack(1, device)
    x, state = make_inputs(device)
    with torch.no_grad():
        rebuilt = column.inverse(x, column(x, state))
    for got, want in zip(rebuilt, state, strict=True):
        assert rel_diff(got, want) < 1e-5


@pytest.mark.parametrize("n", [1, 3])
def test_reversible_and_plain_give_the_same_outputs_and_gradients(device: torch.device, n: int) -> None:
    columns, heads = make_stack(n, device)
    params = [p for m in (*columns, *heads) for p in m.parameters()]
    results = {}
    for reversible in (False, True):
        x, state = make_inputs(device)
        x.requires_grad_()
        state = tuple(t.requires_grad_() for t in state)
        for p in params:
            p.grad = None
        outputs = run_columns(columns, heads, x, state, reversible=reversible)
        # A loss over every column output, as in training, with different weights per column.
        loss = sum((i + 1) * (o.sin() * o).mean() for i, o in enumerate(outputs))
        loss.backward()
        results[reversible] = ([o.detach() for o in outputs], x.grad, [t.grad for t in state], [p.grad for p in params])
    plain, rev = results[False], results[True]
    for a, b in zip(rev[0], plain[0], strict=True):
        assert rel_diff(a, b) < 1e-5
    assert rel_diff(rev[1], plain[1]) < 1e-5
    for a, b in zip(rev[2], plain[2], strict=True):
        assert rel_diff(a, b) < 1e-5
    assert all(g is not None for g in rev[3])
    worst = max(rel_diff(a, b) for a, b in zip(rev[3], plain[3], strict=True))
    assert worst < 1e-5, worst


def test_reversible_skips_heads_without_gradient(device: torch.device) -> None:
    columns, heads = make_stack(2, device)
    x, state = make_inputs(device)
    state = tuple(t.requires_grad_() for t in state)
    outputs = run_columns(columns, heads, x, state, reversible=True)
    outputs[1].sum().backward()  # only the last head is used
    assert heads[0][0].weight.grad is None or heads[0][0].weight.grad.abs().sum() == 0
    assert heads[1][0].weight.grad is not None and columns[0].alpha0.grad is not None


def test_alpha_is_clamped_away_from_zero_in_training_only() -> None:
    column = Column(WIDTH)
    with torch.no_grad():
        column.alpha0.zero_()
        column.alpha1.fill_(-1e-6)
    column.train()
    alphas = column.alphas()
    assert torch.all(alphas[0] == ALPHA_MIN) and torch.all(alphas[1] == -ALPHA_MIN)
    assert torch.all(alphas[2] == 0.5)
    column.eval()
    assert torch.all(column.alphas()[0] == 0)
