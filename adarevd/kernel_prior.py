"""UFPNet's blur-kernel prior: a per-pixel kernel code from a small U-Net, turned into a kernel by a flow.

Both parts are frozen inside the UFPNet encoder. Module and buffer names follow the authors'
checkpoints (`kernel_extra.*`, `flow.*`), typos included where the keys carry them.

Shapes: image (B, 3, H, W) -> code (B, K*K, H, W) and sigma (B, 1, H, W) -> kernel map (B, K*K, H, W),
where K = kernel_size (19 in every released checkpoint).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.Conv_head = nn.Conv2d(cin, cout, 3, padding=1)
        self.ResBlock1 = _ResBlock(cout)
        self.ResBlock2 = _ResBlock(cout)
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = F.relu(self.ResBlock2(self.ResBlock1(self.Conv_head(x))))
        return self.downsample(skip), skip


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.Conv_t = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1)
        self.Conv_head = nn.Conv2d(2 * cout, cout, 3, padding=1)
        self.ResBlock1 = _ResBlock(cout)
        self.ResBlock2 = _ResBlock(cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.Conv_t(x, output_size=skip.shape[-2:])
        return F.relu(self.ResBlock2(self.ResBlock1(self.Conv_head(torch.cat([up, skip], dim=1)))))


class _Mid(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        convs = [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(5)]
        self.body = nn.Sequential(*[m for conv in convs for m in (conv, nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Tail(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.mean = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.var = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1), nn.Sigmoid()
        )


class KernelCodeNet(nn.Module):
    """U-Net giving each pixel a standardised kernel code (B, K*K, H, W) and an uncertainty (B, 1, H, W)."""

    def __init__(self, kernel_size: int = 19) -> None:
        super().__init__()
        self.Encoding_Block1 = _Down(3, 64)
        self.Encoding_Block2 = _Down(64, 128)
        self.Conv_mid = _Mid(128, 256)
        self.Decoding_Block1 = _Up(256, 128)
        self.Decoding_Block2 = _Up(128, 64)
        self.Conv_tail = _Tail(64, kernel_size * kernel_size)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, skip1 = self.Encoding_Block1(image)
        x, skip2 = self.Encoding_Block2(x)
        x = self.Decoding_Block2(self.Decoding_Block1(self.Conv_mid(x), skip2), skip1)
        code = torch.softmax(self.Conv_tail.mean(x), dim=1)
        # Standardise each pixel's code over its K*K entries (unbiased std, as the reference does).
        code = (code - code.mean(dim=1, keepdim=True)) / code.std(dim=1, keepdim=True)
        sigma = self.Conv_tail.var(x).mean(dim=1, keepdim=True)
        return code, sigma


class _MaskedCoupling(nn.Module):
    """RealNVP coupling: the masked half passes, the rest is scaled by exp(s) and shifted by t of it."""

    def __init__(self, size: int, hidden: int, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.s_net = nn.Sequential(
            nn.Linear(size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, size)
        )
        self.t_net = nn.Sequential(
            nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, size)
        )

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        mu = u * self.mask
        return mu + (1 - self.mask) * (u * self.s_net(mu).exp() + self.t_net(mu))


class _FlowBatchNorm(nn.Module):
    """The flow's batch norm; at inference it uses the running statistics a checkpoint sets."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(size))
        self.beta = nn.Parameter(torch.zeros(size))
        self.register_buffer("running_mean", torch.zeros(size))
        self.register_buffer("running_var", torch.ones(size))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x_hat = (y - self.beta) * torch.exp(-self.log_gamma)
        return x_hat * torch.sqrt(self.running_var + self.eps) + self.running_mean


class KernelFlow(nn.Module):
    """Flow prior over K*K kernels (5 masked couplings, each followed by a batch norm); only its inverse
    is needed: it maps a code vector to a kernel."""

    def __init__(self, kernel_size: int = 19, n_blocks: int = 5, hidden: int = 25, alpha: float = 1e-6) -> None:
        super().__init__()
        size = kernel_size * kernel_size
        self.register_buffer("kernel_size", torch.full((1,), float(kernel_size)))
        self.register_buffer("alpha", torch.full((1,), alpha))
        self.register_buffer("normalization", torch.ones(1))
        self.register_buffer("base_dist_mean", torch.zeros(size))
        self.register_buffer("base_dist_var", torch.ones(size))
        mask = torch.arange(size, dtype=torch.float32) % 2
        layers: list[nn.Module] = []
        for _ in range(n_blocks):
            layers += [_MaskedCoupling(size, hidden, mask), _FlowBatchNorm(size)]
            mask = 1 - mask
        self.net = nn.ModuleList(layers)

    def inverse(self, code: torch.Tensor) -> torch.Tensor:
        """(N, K*K) codes -> (N, K*K) kernels in [0, normalization]."""
        x = code
        for layer in reversed(self.net):
            x = layer.inverse(x)
        return (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha) * self.normalization


@torch.no_grad()
def kernel_map(
    code_net: KernelCodeNet,
    flow: KernelFlow,
    image: torch.Tensor,
    *,
    noise: bool,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-pixel blur kernels (B, K*K, H, W) for an image (B, 3, H, W); frozen, no gradients.

    The code is blurred by its uncertainty, code*sqrt(1-sigma^2) + eps*sigma. `seeds` (one per image):
    each image's eps from a generator of its own seed, so an image's kernels do not depend on what else
    is in the batch or ran before. Without: one draw from torch's default generator in the reference's
    (B, H*W, K*K) order, so a seeded run reproduces it (training). `noise=False` drops the eps term.
    """
    b, _, h, w = image.shape
    code, sigma = code_net(image)  # (B, KK, H, W), (B, 1, H, W)
    code = code.flatten(2).transpose(1, 2)  # (B, H*W, KK)
    sigma = sigma.flatten(2).transpose(1, 2)  # (B, H*W, 1)
    noisy = code * torch.sqrt(1 - sigma.square())
    if noise and seeds is None:
        noisy = noisy + torch.randn_like(code) * sigma
    elif noise:
        if len(seeds) != b:
            raise ValueError(f"kernel noise needs one seed per image: {b} images, {len(seeds)} seeds")
        eps = [_normal(code.shape[1:], seed, code) for seed in seeds]
        noisy = noisy + torch.stack(eps) * sigma
    kernel = flow.inverse(noisy.reshape(b * h * w, -1))
    return kernel.reshape(b, h * w, -1).transpose(1, 2).reshape(b, -1, h, w)


def _normal(shape: torch.Size, seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def content_seeds(images: torch.Tensor) -> list[int]:
    """One seed per image (B, C, H, W) from its values (CRC-32 of its bytes): the same image draws the
    same kernel noise in any batch, run or process."""
    values = images.detach().float().cpu().contiguous().numpy()
    return [zlib.crc32(image.tobytes()) for image in values]


def patch_seeds(seeds: Sequence[int], per_image: int) -> list[int]:
    """The seeds of each image's `per_image` patches, in order (CRC-32 of `seed/index`)."""
    return [zlib.crc32(f"{seed}/{i}".encode()) for seed in seeds for i in range(per_image)]
