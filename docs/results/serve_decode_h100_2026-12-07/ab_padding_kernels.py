"""A/B of the decode experts kernels: padding pairs (rows past `live`) loop over their columns (old) or skip
(new). q30 geometry (H 2048, I 768, K 8, E 128, dense bf16 in a device pool), a bucket of 8 rows."""
import importlib.util, json, os, subprocess, sys, statistics, tempfile, torch
from vismmoe.step import moe_kernel as new
# the kernels before the change, from git (commit 77e7a01), loaded as a module of their own
src = subprocess.run(["git", "show", "77e7a01:src/vismmoe/step/moe_kernel.py"], capture_output=True, text=True,
                     check=True).stdout
src = src.replace("from . import quant_kernels as qk", "from vismmoe.step import quant_kernels as qk")
src = src[:src.index("@torch.library.custom_op")]          # the custom op is registered once, by the new module
path = os.path.join(tempfile.mkdtemp(), "old_moe_kernel.py")
open(path, "w").write(src)
spec = importlib.util.spec_from_file_location("old_moe_kernel", path)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
OUT = os.environ.get("OUT", ".")
torch.manual_seed(0)
H, I, K, E, B = 2048, 768, 8, 128, 8
pool = (torch.randn(E, 3 * I * H, device="cuda") * 0.02).to(torch.bfloat16)
nb = 3 * I * H * 2
addr = torch.tensor([pool.data_ptr() + e * nb for e in range(E)], dtype=torch.int64, device="cuda")
x = torch.randn(B, H, device="cuda").to(torch.bfloat16)
topk = torch.stack([torch.randperm(E)[:K] for _ in range(B)]).cuda()
w = torch.rand(B, K, device="cuda").to(torch.bfloat16)
ri = torch.zeros(B * K, dtype=torch.long, device="cuda"); rw = torch.zeros(B * K, device="cuda")
res = {}
def t(mod, live, n=200):
    lv = torch.tensor([live], dtype=torch.int32, device="cuda")
    tp = topk.clone()
    tp[live:] = tp[0]                                  # padding rows repeat row 0 (graphs.load)
    for _ in range(5):
        mod.decode_experts_triton(x, tp, w, addr, ri, rw, I, live=lv)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); e0.record()
    for _ in range(n):
        out = mod.decode_experts_triton(x, tp, w, addr, ri, rw, I, live=lv)
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / n, out
same = True
for rep in range(6):
    for name, mod in ((("old", old), ("new", new)) if rep % 2 == 0 else (("new", new), ("old", old))):
        for live in (1, 2, 8):
            us, out = t(mod, live)
            res.setdefault(f"{name} live{live}", []).append(us)
            if name == "new":
                _, o2 = t(old, live, 1)
                same &= torch.equal(out[:live], o2[:live])
summ = {k: round(statistics.median(v), 1) for k, v in res.items()}
summ["live rows bit-identical old vs new"] = same
print(json.dumps(summ), flush=True)
json.dump({"us_per_call_median": summ, "all": res}, open(os.path.join(OUT, "kernel_padding_ab.json"), "w"), indent=1)
