"""One UNet forward, and forward + backward w.r.t. the text context (what null-text optimisation runs), per dtype.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/probe_backward.py     # GPU
"""
import pathlib
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from support import comfy_host
comfy_host.boot(pathlib.Path(tempfile.mkdtemp()), cpu=False)
from support.pack import import_pack; import_pack()
import bench
from editkit.nodes.inversion import ComfyEps
dev = torch.device("cuda")
def t_fb(eps, ctx_dtype=torch.float32, n=20, grad=True, sdpa=None):
    x = torch.randn(1, 4, 64, 64, device=dev)
    emb = torch.randn(1, 77, 768, device=dev, dtype=ctx_dtype, requires_grad=grad)
    times = []
    for i in range(n + 3):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.enable_grad() if grad else torch.no_grad():
            out = eps(x, 5.0, emb)
            if grad: out.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        if i >= 3: times.append(time.perf_counter() - t)
    return min(times)
for dtype in (torch.float16, torch.float32, torch.bfloat16):
    m = bench.build_sd15(dev, dtype)
    e = ComfyEps(m)
    print(dtype, "fwd", round(t_fb(e, grad=False) * 1000, 1), "ms; fwd+bwd", round(t_fb(e) * 1000, 1), "ms", flush=True)
    m.model.diffusion_model.requires_grad_(True)
    print(dtype, "fwd+bwd with weight grads", round(t_fb(e) * 1000, 1), "ms", flush=True)
    with torch.autograd.profiler.profile(use_device="cuda") as prof:
        t_fb(e, n=2)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
    del m, e; torch.cuda.empty_cache()
