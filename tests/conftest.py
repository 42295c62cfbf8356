import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give


def tiny_unet_and_scheduler(size: int = 8, channels: int = 1, seed: int = 0):
    """A random-init diffusers UNet2DModel as small as diffusers' own tests build."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    return unet, sched


def blobs(n: int, generator: torch.Generator, size: int = 8) -> torch.Tensor:
    """Synthetic smooth images in [-1, 1]: two Gaussian blobs each, (n, 1, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    c = torch.rand(n, 2, 2, generator=generator) * size
    r = 1 + torch.rand(n, 2, generator=generator) * 2
    img = sum(torch.exp(-((xx - c[:, k, 0, None, None]) ** 2 + (yy - c[:, k, 1, None, None]) ** 2)
                        / (2 * r[:, k, None, None] ** 2)) for k in range(2))
    return (img.clamp(0, 1) * 2 - 1)[:, None]


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 1, dim: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.penultimate = nn.Sequential(nn.Flatten(), nn.LazyLinear(dim), nn.Tanh())
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.penultimate(self.features(x)))


@pytest.fixture
def tiny_prior():
    from featinv.priors import PixelPrior

    return PixelPrior(*tiny_unet_and_scheduler())


@pytest.fixture(scope="session")
def blob_prior():
    """A tiny UNet trained for 150 steps (~5 s) on blobs: a real, if crude, prior whose x0-hat is
    meaningful (a random UNet's x0-hat is saturated noise, useless for x0-space guidance)."""
    from featinv.priors import PixelPrior

    unet, sched = tiny_unet_and_scheduler()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(unet.parameters(), 3e-3)
    for _ in range(150):
        x = blobs(64, g)
        n = torch.randn(x.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (64,), generator=g)
        loss = (unet(sched.add_noise(x, n, t), t).sample - n).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return PixelPrior(unet, sched)


@pytest.fixture
def tiny_encoder():
    from featinv.encoders import Encoder

    torch.manual_seed(1)
    m = TinyCNN()
    m(torch.zeros(1, 1, 8, 8))  # materialise the lazy layer
    return Encoder(m, "penultimate", input_size=8, in_chans=1, name="tiny-cnn")


@pytest.fixture(autouse=True)
def _no_shared_wandb_service(monkeypatch):
    """An in-process W&B run exports WANDB_SERVICE; subprocesses (CLI, DDP runs) must start their own
    service rather than attach to this process's one (whose runs tests finish and tear down)."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
