"""Where one E-PMQ layer's time goes on a CUDA GPU (torch profiler), beside plain GPTQ.

    PYTHONPATH=. python benchmarks/profile_epmq_layer.py

4096x4096, 8 experts, 4-bit group 128. benchmarks/results/epmq-layer-profile-<card>.txt holds
a run's table.
"""
import torch
from epmq import QuantSpec, quant
from torch.profiler import profile, ProfilerActivity
torch.backends.cuda.matmul.allow_tf32 = False
d = 4096; dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
W_m = torch.randn(d, d, device=dev, generator=g) / 64
W_k = [W_m + 0.01 * torch.randn(d, d, device=dev, generator=g) / 64 for _ in range(8)]
X = torch.randn(2 * d, d, device=dev, generator=g)
H = X.T @ X
H_k = [H * (1 + 0.1 * k) for k in range(8)]
spec = QuantSpec(4, 128)
for _ in range(2):
    quant.epmq(W_m, W_k, H_k, spec); quant.gptq(W_m, H, spec)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    quant.epmq(W_m, W_k, H_k, spec); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    quant.gptq(W_m, H, spec); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
