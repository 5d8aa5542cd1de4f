"""Does compiled FlexAttention run here, and how fast is a document mask against sdpa? (run in call 1; reformatted
for the linter afterwards, the same statements)"""

import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for mod in ("triton", "deepspeed", "flash_attn", "vllm", "bitsandbytes", "liger_kernel"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "absent:", type(e).__name__)
dev = "cuda"
H, D = 9, 64
L = 32 * 200
doc = torch.arange(L, device=dev) // 200
pos = torch.arange(L, device=dev) % 200


def mask_mod(b, h, q, k):
    return (doc[q] == doc[k]) & (pos[k] <= pos[q])


flex = torch.compile(flex_attention)
q = torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 3, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 3, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
t0 = time.time()
bm = create_block_mask(mask_mod, None, None, L, L, device=dev)
out = flex(q, k, v, block_mask=bm, enable_gqa=True)
out.float().sum().backward()
torch.cuda.synchronize()
print(f"first flex fwd+bwd (compile) {time.time() - t0:.1f} s")


def bench(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.time() - t) / n * 1e3


def f_flex():
    flex(q, k, v, block_mask=bm, enable_gqa=True).float().sum().backward()


def rows(x, heads):
    return x.detach().view(1, heads, 32, 200, D).transpose(1, 2).reshape(32, heads, 200, D).requires_grad_()


qp, kp, vp = rows(q, H), rows(k, 3), rows(v, 3)


def f_sdpa():
    torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True).float().sum().backward()


print(f"flex doc mask fwd+bwd {bench(f_flex):.2f} ms; sdpa padded-equivalent causal {bench(f_sdpa):.2f} ms")
sdpa = torch.nn.functional.scaled_dot_product_attention
ref = sdpa(qp.detach().float(), kp.detach().float(), vp.detach().float(), is_causal=True, enable_gqa=True)
o = flex(q.detach(), k.detach(), v.detach(), block_mask=bm, enable_gqa=True).float()
o = o.view(1, H, 32, 200, D).transpose(1, 2).reshape(32, H, 200, D)
print("max abs diff flex vs sdpa fp32:", (o - ref).abs().max().item())
torch.cuda.synchronize()
print("peak GiB", torch.cuda.max_memory_allocated() / 2**30)
