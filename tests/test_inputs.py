"""Bad inputs raise one clear error each; encoders adapt images and pass gradients."""
import numpy as np
import pytest
import torch
from PIL import Image

from featinv import Encoder, invert
from featinv.data import FeatureTargets, ImageTargets, TargetDataModule


def test_feature_dim_mismatch(tiny_prior, tiny_encoder):
    with pytest.raises(ValueError, match="dimension 7 does not match encoder 'tiny-cnn', which gives 16"):
        invert(torch.randn(2, 7), prior=tiny_prior, encoder=tiny_encoder, method="unguided", steps=2)


def test_nan_in_target(tiny_prior, tiny_encoder):
    t = torch.randn(3, 16)
    t[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf in row\(s\) \[1\]"):
        invert(t, prior=tiny_prior, encoder=tiny_encoder, method="unguided", steps=2)


def test_unknown_layer_lists_close_matches(tiny_encoder):
    with pytest.raises(KeyError, match="Did you mean: 'penultimate"):
        Encoder(tiny_encoder.model, "penultimat")


def test_unknown_names_suggest():
    from featinv import build_encoder, build_prior

    with pytest.raises(KeyError, match="Did you mean: 'zoo'"):
        build_encoder("zo:digits-cnn")
    with pytest.raises(ValueError, match="family:name"):
        build_prior("digits-ddpm")


def test_encoder_layers_shapes_gradients_and_channels(tiny_encoder):
    x = torch.rand(2, 3, 12, 12, requires_grad=True)  # RGB, wrong size: converted to grey 8x8
    f = tiny_encoder(x)
    assert f.shape == (2, 16)
    torch.nn.functional.cosine_similarity(f, torch.randn(2, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    early = Encoder(tiny_encoder.model, "features.0", input_size=8, in_chans=1)
    assert early(torch.rand(2, 1, 8, 8)).shape == (2, 8 * 8 * 8)
    q = Encoder(tiny_encoder.model, "penultimate", in_chans=1, quantize=True)
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    q(x).sum().backward()  # straight-through rounding keeps the gradient
    assert x.grad.abs().sum() > 0


def test_bad_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ImageTargets(str(tmp_path / "imgs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        ImageTargets(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        FeatureTargets(str(tmp_path / "missing.pt"))
    np.save(tmp_path / "f3.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="N x D"):
        FeatureTargets(str(tmp_path / "f3.npy"))
    with pytest.raises(ValueError, match="unique"):
        np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
        TargetDataModule([FeatureTargets(str(tmp_path / "f.npy")), FeatureTargets(str(tmp_path / "f.npy"))])


@pytest.mark.parametrize("mode,array", [("RGBA", np.full((5, 5, 4), 200, np.uint8)),
                                        ("I;16", np.full((5, 5), 40000, np.uint16)),
                                        ("L", np.full((5, 5), 51, np.uint8))])
def test_image_modes(tmp_path, mode, array):
    Image.fromarray(array).convert(mode).save(tmp_path / "x.png") if mode != "I;16" else \
        Image.fromarray(array).save(tmp_path / "x.png")
    item = ImageTargets(str(tmp_path), channels=3, size=4)[0]
    assert item["image"].shape == (3, 4, 4) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["image"].mean() > 0.15


def test_feature_file_formats(tmp_path):
    from safetensors.torch import save_file

    f = torch.randn(4, 6)
    save_file({"features": f, "labels": torch.arange(4)}, tmp_path / "f.safetensors")
    np.save(tmp_path / "g.npy", f.numpy())
    a, b = FeatureTargets(str(tmp_path / "f.safetensors")), FeatureTargets(str(tmp_path / "g.npy"), limit=2)
    assert len(a) == 4 and a[3]["label"] == 3 and torch.equal(a[1]["feature"], f[1])
    assert len(b) == 2 and b[0]["label"] == -1


def test_wandb_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch):
    from featinv.cli import WandbSettings, make_wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.warns(UserWarning, match="logging offline instead"):
        logger = make_wandb_logger(str(tmp_path), WandbSettings(mode="online"))
    assert logger._wandb_init["mode"] == "offline"
    with pytest.raises(ValueError, match="wandb.mode"):
        make_wandb_logger(str(tmp_path), WandbSettings(mode="offlien"))
