"""Reversible sub-decoders (columns) and the memory-saving autograd that spans all of them.

A column updates a four-level state c = (c0, c1, c2, c3), coarse (8w @ H/8) to fine (w @ H), reading the
encoder's e4 (x) at every column without changing it:

    c_j' = alpha_j * c_j + L_j( up_j(c_{j-1}') + down_j(c_{j+1}) )      (c_{-1}' = x; no down at j = 3)

so the input is rebuilt from the output, finest level first:

    c_j = ( c_j' - L_j( up_j(c_{j-1}') + down_j(c_{j+1}) ) ) / alpha_j

`run_columns(..., reversible=True)` runs every column and head inside one autograd Function that keeps
only the last column's state; the backward pass walks the columns in reverse, rebuilds each column's
input with the inverse, re-runs that column with grad (RNG and autocast state replayed) and takes each
head's gradient on the way. Peak memory is that of one column, whatever the depth. `reversible=False`
is plain autograd over the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from adarevd.blocks import ChannelLayerNorm, FCNAFBlock

State = tuple[torch.Tensor, ...]  # (c0, c1, c2, c3), coarse to fine
ALPHA_MIN = 1e-3
ALPHA_INIT = 0.5


class Fusion(nn.Module):
    """Input of a decoder level: up(coarser, 2C at H/2) + down(finer, C/2 at 2H); no `down` at the finest."""

    def __init__(self, channels: int, finest: bool) -> None:
        super().__init__()
        c = channels
        self.up = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1, bias=False), nn.PixelShuffle(2))
        self.down = None if finest else nn.Sequential(nn.Conv2d(c // 2, c, 2, stride=2), ChannelLayerNorm(c))

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        y = self.up(coarse)
        return y if self.down is None else y + self.down(fine)


class DecoderLevel(nn.Module):
    """L_j: fusion followed by FCNAF blocks."""

    def __init__(self, channels: int, num_blocks: int, finest: bool) -> None:
        super().__init__()
        self.fusion = Fusion(channels, finest)
        self.blocks = nn.Sequential(*[FCNAFBlock(channels) for _ in range(num_blocks)])

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        return self.blocks(self.fusion(coarse, fine))


class Column(nn.Module):
    """One reversible sub-decoder. Levels are registered as `level0..3` and scales as `alpha0..3`, the
    names of the authors' checkpoints; `levels` and `alphas()` give them in order."""

    def __init__(self, width: int, blocks_per_level: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        n = len(blocks_per_level)
        self.num_levels = n
        for j, count in enumerate(blocks_per_level):
            c = width * 2 ** (n - 1 - j)
            self.register_parameter(f"alpha{j}", nn.Parameter(torch.full((1, c, 1, 1), ALPHA_INIT)))
            self.add_module(f"level{j}", DecoderLevel(c, count, finest=j == n - 1))

    @property
    def levels(self) -> list[DecoderLevel]:
        return [getattr(self, f"level{j}") for j in range(self.num_levels)]

    def alphas(self) -> list[torch.Tensor]:
        alphas = [getattr(self, f"alpha{j}") for j in range(self.num_levels)]
        if not self.training:
            return alphas
        # Keep |alpha| >= ALPHA_MIN with its sign, so the column stays invertible while it trains.
        return [torch.where(a >= 0, a.clamp(min=ALPHA_MIN), a.clamp(max=-ALPHA_MIN)) for a in alphas]

    def forward(self, x: torch.Tensor, c: State) -> State:
        out: list[torch.Tensor] = []
        coarse = x
        for j, (level, alpha) in enumerate(zip(self.levels, self.alphas(), strict=True)):
            fine = c[j + 1] if j + 1 < len(c) else None
            coarse = alpha * c[j] + level(coarse, fine)
            out.append(coarse)
        return tuple(out)

    def inverse(self, x: torch.Tensor, c_out: State) -> State:
        c: list[torch.Tensor | None] = [None] * len(c_out)
        alphas = self.alphas()
        for j in reversed(range(len(c_out))):
            coarse = x if j == 0 else c_out[j - 1]
            fine = c[j + 1] if j + 1 < len(c) else None
            c[j] = (c_out[j] - self.levels[j](coarse, fine)) / alphas[j]
        return tuple(t for t in c if t is not None)


def run_columns(
    columns: Sequence[Column], heads: Sequence[nn.Module], x: torch.Tensor, state: State, *, reversible: bool
) -> list[torch.Tensor]:
    """Run every column on (x, state) and return each column's head output (the residuals), in order."""
    if not reversible:
        residuals = []
        for column, head in zip(columns, heads, strict=True):
            state = column(x, state)
            residuals.append(head(state[-1]))
        return residuals
    params = [p for m in (*columns, *heads) for p in m.parameters() if p.requires_grad]
    return list(_ReversibleColumns.apply(tuple(columns), tuple(heads), len(state), x, *state, *params))


class _RngReplay:
    """The CPU (and CUDA) generator state at one point of the forward pass, to replay in backward."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        cuda_devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _ReversibleColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, columns, heads, n_state, x, *rest):  # type: ignore[override]
        state, params = tuple(rest[:n_state]), rest[n_state:]
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.columns, ctx.heads, ctx.n_params = columns, heads, len(params)
        ctx.rng = []
        residuals = []
        for column, head in zip(columns, heads, strict=True):
            ctx.rng.append(_RngReplay(x.device))
            state = column(x, state)
            residuals.append(head(state[-1]))
        ctx.save_for_backward(x, *state, *params)
        return tuple(residuals)

    @staticmethod
    def backward(ctx, *grad_residuals):  # type: ignore[override]
        saved = ctx.saved_tensors
        x, params = saved[0].detach(), saved[len(saved) - ctx.n_params :]
        state = tuple(t.detach() for t in saved[1 : len(saved) - ctx.n_params])
        slot = {id(p): k for k, p in enumerate(params)}
        grad_params: list[torch.Tensor | None] = [None] * len(params)

        def accumulate(modules_params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
            for p, g in zip(modules_params, grads, strict=True):
                if g is not None:
                    k = slot[id(p)]
                    grad_params[k] = g if grad_params[k] is None else grad_params[k] + g

        grad_x = torch.zeros_like(x)
        grad_state = [torch.zeros_like(t) for t in state]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        for i in reversed(range(len(ctx.columns))):
            column, head = ctx.columns[i], ctx.heads[i]
            with ctx.rng[i].replay(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                if grad_residuals[i] is not None:
                    head_params = [p for p in head.parameters() if p.requires_grad]
                    last = state[-1].detach().requires_grad_()
                    with torch.enable_grad():
                        out = head(last)
                    grads = torch.autograd.grad(out, [last, *head_params], grad_residuals[i], allow_unused=True)
                    grad_state[-1] = grad_state[-1] + grads[0]
                    accumulate(head_params, grads[1:])
                with torch.no_grad():
                    prev = column.inverse(x, state)
                column_params = [p for p in column.parameters() if p.requires_grad]
                x_in = x.detach().requires_grad_()
                prev_in = tuple(t.detach().requires_grad_() for t in prev)
                with torch.enable_grad():
                    out_state = column(x_in, prev_in)
                grads = torch.autograd.grad(out_state, [x_in, *prev_in, *column_params], grad_state, allow_unused=True)
            n = len(prev_in)
            grad_x = grad_x + (grads[0] if grads[0] is not None else 0)
            pairs = zip(grads[1 : 1 + n], prev, strict=True)
            grad_state = [g if g is not None else torch.zeros_like(t) for g, t in pairs]
            accumulate(column_params, grads[1 + n :])
            state = tuple(t.detach() for t in prev)
        return (None, None, None, grad_x, *grad_state, *grad_params)
