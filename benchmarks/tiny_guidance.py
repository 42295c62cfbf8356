"""One measured example on the tiny test models: feature distance per step, guided vs unguided.

    python benchmarks/tiny_guidance.py
"""
import os, sys; os.environ["HF_HUB_OFFLINE"]="1"; sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import torch; torch.set_num_threads(1)
from conftest import tiny_unet_and_scheduler, TinyCNN
from featinv import invert, PixelPrior, Encoder
prior = PixelPrior(*tiny_unet_and_scheduler())
torch.manual_seed(1); m = TinyCNN(); m(torch.zeros(1,1,8,8)); enc = Encoder(m, "penultimate", input_size=8, in_chans=1)
torch.manual_seed(5); target = enc(torch.rand(4,1,8,8)).detach()
kw = dict(prior=prior, encoder=enc, seed=3, steps=12, recurrence=2, early_steps=2, early_recurrence=4)
u = invert(target, method="fast", weight=0.0, clamp_k=None, **kw); g = invert(target, method="fast", weight=8.0, schedule="constant", **kw)
print("guided   distance per step (mean over 4):", [round(x, 4) for x in g.distances.mean(0).tolist()])
print("unguided distance per step (mean over 4):", [round(x, 4) for x in u.distances.mean(0).tolist()])
print("final cos guided", g.final_cos.mean().item(), "unguided", u.final_cos.mean().item())
print("final l2 guided", g.final_l2.mean().item(), "unguided", u.final_l2.mean().item())
