"""Field throughput: the Taichi field's forward+backward (sdf + finite-difference normal + colour) beside
the same field written in plain torch, the MLP part's achieved GFLOP/s beside the machine's fp32 peak,
and the kernels' compile time cold and with the offline cache warm.

    python benchmarks/field_throughput.py [--n 262144] [--arch cpu] [--baseline cfe4880] [--no-compile]
        [--normal-mode tetrahedral|central|analytic] [--json benchmarks/results/field_throughput.json]

``--normal-mode analytic`` times the field with the exact normal (forward-mode tangents) on both sides:
the torch field then takes the normal by autograd with ``create_graph`` and its backward is a double
backward. The default is the field's default (the tetrahedral stencil).

``--baseline REV`` loads the hash-grid and MLP kernels of commit REV (``git show``, no checkout) into this
same process and times them against today's, alternating old and new (A B A B ...) on the same data,
so the ratios survive a shared machine better than two separate runs. ``torch.compile`` of the torch
field is timed too when it compiles here (``--no-compile`` skips it).

Prints a table and writes JSON. Speed is measured here, never asserted in a test.
"""

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
NORMAL_MODE = os.environ.get("TAICHI_NEUS_BENCH_NORMAL_MODE", "tetrahedral")  # set by --normal-mode


def _field_setup(n, seed=0):
    from taichi_neus import buffers
    from taichi_neus.field.params import ParamLayout
    from taichi_neus.field.sdf_field import FieldConfig, SDFField
    layout = ParamLayout()
    # the field this benchmark has always timed (issue 10): without the colour grid that is on by default
    # since 2026-11-28, so its figures compare with the earlier ones and with --baseline commits
    field = SDFField(FieldConfig(normal_mode=NORMAL_MODE, color_encoding=False), layout)
    params, grads = layout.allocate(), layout.allocate()
    field.init_params(params, seed)
    # geometric init zeroes the encoding's weights; perturb so every gradient path does real work
    host = buffers.to_numpy(params).copy()
    w = field.sdf_layers[0].W
    rng = np.random.default_rng(seed)
    host[w.offset:w.offset + w.size] += rng.normal(0, 0.05, w.size).astype(np.float32)
    buffers.from_numpy(params, host)
    pts = rng.uniform(-0.9, 0.9, (n, 3)).astype(np.float32)
    d = rng.normal(size=(n, 3))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    ups = [rng.normal(size=s).astype(np.float32) for s in [(n,), (n, 3), (n, 3)]]
    return field, layout, params, grads, pts, d, ups


def mlp_flops_per_point(field) -> float:
    """Multiply-adds ×2 of forward + backward (dW and dX) of both MLPs for one field point."""
    K = field.K
    fwd = sum(lin.n_in * lin.n_out for lin in field.sdf_layers) * K
    fwd += sum(lin.n_in * lin.n_out for lin in field.color_layers)
    return 2.0 * 3.0 * fwd


def bench_taichi(n, repeats, gpu=False):
    import taichi as ti
    from taichi.lang import kernel_impl

    from taichi_neus import buffers
    field, layout, params, grads, pts, d, ups = _field_setup(n)
    P, D = buffers.upload(pts), buffers.upload(d)
    U = [buffers.upload(u) for u in ups]

    def step():
        field.forward(P, D, n, params)
        field.backward(*U, params, grads)
        ti.sync()

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    # time per kernel family: each kernel's total over one step, the least over `repeats` more steps
    orig = kernel_impl.Kernel.launch_kernel
    acc = {}
    one = collections.defaultdict(float)

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        r = orig(self, *a, **k)
        if gpu:  # launches are asynchronous on a GPU: wait for this kernel to finish
            ti.sync()
        one[self.func.__name__] += time.perf_counter() - t0
        return r

    kernel_impl.Kernel.launch_kernel = timed
    try:
        for _ in range(repeats):
            one.clear()
            step()
            for k, v in one.items():
                acc[k] = min(acc.get(k, v), v)
    finally:
        kernel_impl.Kernel.launch_kernel = orig
    mlp_t = sum(v for k, v in acc.items() if k.startswith("linear_") or k in ("act_backward", "pack_weights"))
    hash_t = sum(v for k, v in acc.items() if k.startswith("hash_encode"))
    best = min(times)
    return {"seconds": best, "points_per_s": n / best, "mlp_seconds": mlp_t, "hash_seconds": hash_t,
            "mlp_gflops": mlp_flops_per_point(field) * n / mlp_t / 1e9, "kernels": dict(acc)}


def bench_torch(n, repeats, compiled=False, device="cpu"):
    import torch

    from taichi_neus import buffers
    from taichi_neus.field.torch_reference import TorchField
    torch.set_num_threads(os.cpu_count() or 1)
    field, layout, params, grads, pts, d, ups = _field_setup(n)
    theta = torch.tensor(buffers.to_numpy(params), device=device, requires_grad=True)
    tf = TorchField(field)
    x, dirs = torch.tensor(pts, device=device), torch.tensor(d, device=device)
    us = [torch.tensor(u, device=device) for u in ups]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    fwd = tf.forward
    if compiled:
        fwd = torch.compile(tf.forward)

    def step():
        theta.grad = None
        s, nr, rgb = fwd(theta, x, dirs, field.cfg.fd_eps)
        ((s * us[0]).sum() + (nr * us[1]).sum() + (rgb * us[2]).sum()).backward()
        sync()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"seconds": best, "points_per_s": n / best, "threads": torch.get_num_threads(), "first_call_s": first,
            "device": device}


def _load_rev_module(rev: str, path: str, name: str):
    """Module ``path`` of commit ``rev`` (from ``git show``), importable beside today's package."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    tmp = pathlib.Path(tempfile.mkdtemp()) / f"{name}.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location(name, tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_baseline(rev: str, n: int, repeats: int) -> dict:
    """Hash-grid forward/backward and the field's MLP layers, commit ``rev`` against today, alternated in
    one process on the same inputs. Kernel-level: ``rev``'s kernels read row-major float buffers, today's
    rows of 16-float vectors; each side gets its own copy of the same numbers."""
    import taichi as ti

    from taichi_neus import buffers
    from taichi_neus.field import hash_grid, mlp
    from taichi_neus.field.params import ParamLayout
    from taichi_neus.field.sdf_field import FieldConfig, SDFField
    old_hash = _load_rev_module(rev, "taichi_neus/field/hash_grid.py", "baseline_hash_grid")
    old_mlp = _load_rev_module(rev, "taichi_neus/field/mlp.py", "baseline_mlp")
    rng = np.random.default_rng(0)
    field = SDFField(FieldConfig(color_encoding=False), ParamLayout())
    K, cfg = field.K, field.cfg.grid
    rows = n * K
    new_grid = hash_grid.HashGrid(cfg, ParamLayout())
    old_layout = ParamLayout()
    old_grid = old_hash.HashGrid(old_hash.HashGridConfig(**vars(cfg)), old_layout)
    params, g_old, g_new = old_layout.allocate(), old_layout.allocate(), old_layout.allocate()
    new_grid.init_params(params, 0)
    pts = rng.uniform(-0.9, 0.9, (n, 3)).astype(np.float32)
    off = np.concatenate([np.zeros((1, 3)), rng.normal(0, 1 / 256, (K - 1, 3))]).astype(np.float32)
    pos = np.concatenate([(pts[:, None] + off[None]).reshape(rows, 3), np.zeros((rows, cfg.out_dim), np.float32)], 1)
    upstream = np.concatenate([np.zeros((rows, 3)), rng.normal(size=(rows, cfg.out_dim))], 1).astype(np.float32)
    Xo, dXo = buffers.upload(pos), buffers.upload(upstream)
    Xn, dXn = buffers.rows16_upload(pos), buffers.rows16_upload(upstream)
    cases = {
        "hash_forward": (lambda: old_grid.forward(Xo, rows, 3, params), lambda: new_grid.forward(Xn, rows, 3, params)),
        "hash_backward": (lambda: old_grid.backward(Xo, dXo, rows, 3, g_old),
                          lambda: new_grid.backward(Xn, dXn, rows, 3, g_new)),
    }
    # the field's layers at the field's row counts: SDF net on the K stencil rows, colour net on n
    shapes = [(lin, rows) for lin in field.sdf_layers] + [(lin, n) for lin in field.color_layers]
    acts = {mlp.ACT_NONE: "none", mlp.ACT_RELU: "relu", mlp.ACT_SOFTPLUS: "softplus", mlp.ACT_SIGMOID: "sigmoid"}
    sides = {"old": [], "new": []}
    for lin, m in shapes:
        x = rng.normal(size=(m, lin.n_in)).astype(np.float32)
        up = rng.normal(size=(m, lin.n_out)).astype(np.float32)
        for side, mod in (("old", old_mlp), ("new", mlp)):
            lay = ParamLayout()
            L = mod.Linear(lay, "l", lin.n_in, lin.n_out, act=acts[lin.act], beta=lin.beta)
            p, g = lay.allocate(), lay.allocate()
            buffers.from_numpy(p, rng.normal(0, 0.1, lay.total).astype(np.float32))
            if side == "old":
                X, Y = buffers.upload(x), buffers.f32(m, lin.n_out)
                dY, dX = buffers.upload(up), buffers.f32(m, lin.n_in)
            else:
                X, Y, dY, dX = (buffers.rows16_upload(x), buffers.rows16(m, lin.n_out), buffers.rows16_upload(up),
                                buffers.rows16(m, lin.n_in))
            sides[side].append((L, X, Y, dY, dX, p, g, m))

    def fwd(side):
        for L, X, Y, _, _, p, _, m in sides[side]:
            L.forward(X, 0, Y, m, p)

    def bwd(side):
        for L, X, Y, dY, dX, p, g, m in sides[side]:
            L.backward(X, 0, Y, dY, m, p, g, dX=dX)

    cases["mlp_forward"] = (lambda: fwd("old"), lambda: fwd("new"))
    cases["mlp_backward"] = (lambda: bwd("old"), lambda: bwd("new"))

    def timed(fn):
        ti.sync()
        w, c = time.perf_counter(), time.process_time()
        fn()
        ti.sync()
        return time.perf_counter() - w, time.process_time() - c

    out = {"rev": rev, "n": n, "rows": rows}
    for name, (old, new) in cases.items():
        old()
        new()
        ta, tb = [], []
        for _ in range(max(repeats, 3)):  # A B A B ...
            ta.append(timed(old))
            tb.append(timed(new))
        pair = sorted(a[0] / b[0] for a, b in zip(ta, tb, strict=True))
        out[name] = {"old_s": min(t[0] for t in ta), "new_s": min(t[0] for t in tb),
                     "speedup": min(t[0] for t in ta) / min(t[0] for t in tb),
                     "speedup_pairs": [pair[0], pair[-1]],
                     "speedup_cpu_time": min(t[1] for t in ta) / min(t[1] for t in tb)}
    return out


def fp32_peak(gpu=False):
    """Achieved fp32 rate of a Taichi kernel of independent FMA chains, and of a large torch SGEMM (on the
    GPU when ``gpu``: enough threads to fill it, and torch on CUDA)."""
    import taichi as ti
    import torch

    @ti.kernel
    def fma(out: ti.types.ndarray(dtype=ti.f32, ndim=1), iters: ti.i32):
        for t in range(out.shape[0]):
            a = ti.Vector([ti.cast(t + k, ti.f32) * 1e-3 for k in range(16)])
            for _ in range(iters):
                for k in ti.static(range(16)):
                    a[k] = a[k] * 0.999 + 0.001
            out[t] = a.sum()

    from taichi_neus import buffers
    threads, iters = (1 << 20, 2000) if gpu else (4096, 20000)
    out = buffers.f32(threads)
    fma(out, 10)
    ti.sync()
    t = time.perf_counter()
    fma(out, iters)
    ti.sync()
    dt = time.perf_counter() - t
    taichi_peak = threads * iters * 16 * 2 / dt / 1e9
    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    a, b = torch.rand(2048, 2048, device=dev), torch.rand(2048, 2048, device=dev)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    sync()
    sgemm = 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    return {"taichi_fma_gflops": taichi_peak, "torch_sgemm_gflops": sgemm}


_COMPILE_PROBE = """
import time, sys
t0 = time.perf_counter()
sys.path.insert(0, {here!r})
from taichi_neus import runtime
runtime.init({arch!r}, verbose=False)
import field_throughput as ft
import taichi as ti
from taichi_neus import buffers
field, layout, params, grads, pts, d, ups = ft._field_setup(1024)
P, D = buffers.upload(pts), buffers.upload(d)
U = [buffers.upload(u) for u in ups]
field.forward(P, D, 1024, params); field.backward(*U, params, grads); ti.sync()
t1 = time.perf_counter()
field.forward(P, D, 1024, params); field.backward(*U, params, grads); ti.sync()
t2 = time.perf_counter()
print((t1 - t0) - (t2 - t1))
"""


def compile_times(arch):
    """Seconds from process start to the first finished fwd+bwd (minus a steady-state one): cold, then warm."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TAICHI_NEUS_CACHE": cache}
        code = _COMPILE_PROBE.format(here=str(HERE), arch=arch)
        res = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-2000:])
            res.append(float(p.stdout.strip().splitlines()[-1]))
    return {"cold_s": res[0], "warm_s": res[1]}


def _torch_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 18)
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--baseline", default="", help="git revision whose hash-grid and MLP kernels to time side by side")
    ap.add_argument("--normal-mode", default="tetrahedral", choices=("tetrahedral", "central", "analytic"))
    ap.add_argument("--json", default=str(HERE / "results" / "field_throughput.json"))
    args = ap.parse_args()
    global NORMAL_MODE
    NORMAL_MODE = os.environ["TAICHI_NEUS_BENCH_NORMAL_MODE"] = args.normal_mode  # the compile probe's too
    from taichi_neus import runtime
    arch = runtime.init(args.arch, verbose=False)
    res = {"n": args.n, "arch": arch, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "normal_mode": args.normal_mode}
    gpu = arch in ("cuda", "vulkan", "metal")
    # the torch baseline runs where the kernels run when torch can: CUDA tensors on the CUDA backend
    tdev = "cuda" if arch == "cuda" and _torch_cuda() else "cpu"
    res["taichi"] = bench_taichi(args.n, args.repeats, gpu=gpu)
    if not args.skip_torch:
        res["torch"] = bench_torch(args.n, args.repeats, device=tdev)
        res["speedup_vs_torch"] = res["torch"]["seconds"] / res["taichi"]["seconds"]
        if not args.no_compile:
            try:
                res["torch_compile"] = bench_torch(args.n, args.repeats, compiled=True, device=tdev)
                res["speedup_vs_torch_compile"] = res["torch_compile"]["seconds"] / res["taichi"]["seconds"]
            except Exception as e:  # inductor needs a C++ toolchain; report, don't fail the table
                res["torch_compile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    if args.baseline:
        res["baseline"] = bench_baseline(args.baseline, args.n, args.repeats)
    res["peak"] = fp32_peak(gpu=gpu)
    res["mlp_fraction_of_peak"] = res["taichi"]["mlp_gflops"] / res["peak"]["taichi_fma_gflops"]
    res["compile"] = compile_times(args.arch)
    tt = res["taichi"]
    rows = [("points", f"{args.n}"),
            ("taichi fwd+bwd", f"{tt['seconds']:.3f} s   {tt['points_per_s'] / 1e6:.3f} Mpts/s"),
            ("  of which MLP", f"{tt['mlp_seconds']:.3f} s   {tt['mlp_gflops']:.1f} GFLOP/s"),
            ("  of which hash grid", f"{tt['hash_seconds']:.3f} s")]
    if "torch" in res:
        tr = res["torch"]
        rows += [("torch fwd+bwd", f"{tr['seconds']:.3f} s   {tr['points_per_s'] / 1e6:.3f} Mpts/s "
                                   f"({tr['device']}, {tr['threads']} CPU threads)"),
                 ("speed-up vs torch", f"{res['speedup_vs_torch']:.2f}x   (target: >= 4x)")]
    if "torch_compile" in res:
        tc = res["torch_compile"]
        if "error" in tc:
            rows += [("torch.compile", f"did not run: {tc['error']}")]
        else:
            rows += [("torch.compile fwd+bwd", f"{tc['seconds']:.3f} s   {tc['points_per_s'] / 1e6:.3f} Mpts/s "
                                               f"(first call {tc['first_call_s']:.0f} s)"),
                     ("speed-up vs torch.compile", f"{res['speedup_vs_torch_compile']:.2f}x")]
    if "baseline" in res:
        b = res["baseline"]
        for k in ("hash_forward", "hash_backward", "mlp_forward", "mlp_backward"):
            v = b[k]
            rows += [(f"{k} vs {b['rev']}", f"{v['old_s']:.3f} s -> {v['new_s']:.3f} s   {v['speedup']:.2f}x "
                                            f"(pairs {v['speedup_pairs'][0]:.2f}-{v['speedup_pairs'][1]:.2f}x, "
                                            f"CPU time {v['speedup_cpu_time']:.2f}x)")]
    rows += [("fp32 peak (Taichi FMA)", f"{res['peak']['taichi_fma_gflops']:.1f} GFLOP/s"),
             ("MLP share of that peak", f"{100 * res['mlp_fraction_of_peak']:.0f} %   (target: >= 25 %)"),
             ("torch SGEMM 2048^3", f"{res['peak']['torch_sgemm_gflops']:.1f} GFLOP/s"),
             ("compile, cold cache", f"{res['compile']['cold_s']:.1f} s"),
             ("compile, warm cache", f"{res['compile']['warm_s']:.1f} s")]
    print(f"\nfield forward+backward, arch={arch}, {res['cpus']} CPUs, normal {args.normal_mode}")
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
