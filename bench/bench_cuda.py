"""Per-layer CNN7 (CIFAR-10) timings of the interval layers: the cuda backend against torch eager
and the two-product floor (cuBLAS / cuDNN doing W·c and |W|·r alone, no epilogue), forward and
forward + backward, for the stacked natural + l∞ + l2 streams; for the convolutions also the two
methods of the cuda conv on their own (the implicit GEMM and cuDNN + fused epilogue; "cuda" is the
measured auto choice between them). GPU only.

    python bench/bench_cuda.py [--batch 128] [--precision ieee] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

# name, kind, (in, out, kernel, stride, padding, image) for convs / (in, out) for linears;
# CNN7 with width 64 and linear 512 on 3x32x32.
LAYERS = [
    ("conv1", "conv", (3, 64, 3, 1, 1, 32)),
    ("conv2", "conv", (64, 64, 3, 1, 1, 32)),
    ("conv3", "conv", (64, 128, 3, 2, 1, 32)),
    ("conv4", "conv", (128, 128, 3, 1, 1, 16)),
    ("conv5", "conv", (128, 128, 3, 1, 1, 16)),
    ("fc1", "linear", (128 * 16 * 16, 512)),
    ("fc2", "linear", (512, 10)),
]


def _median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _layer(kind, dims, batch, streams, dtype):
    """Inputs (c, r), weight and per-feature BatchNorm scale / shift of one layer; rotating copies."""
    n, m = batch * streams, batch * (streams - 1)
    if kind == "conv":
        cin, cout, k, _, _, size = dims
        shape, wshape = (cin, size, size), (cout, cin, k, k)
    else:
        cin, cout = dims
        shape, wshape = (cin,), (cout, cin)
    copies = 3  # rotate inputs so that one run does not find the previous one's data in L2
    cs = [torch.randn((n,) + shape, device="cuda", dtype=dtype) for _ in range(copies)]
    rs = [torch.rand((m,) + shape, device="cuda", dtype=dtype) for _ in range(copies)]
    w = torch.randn(wshape, device="cuda", dtype=dtype) / wshape[1] ** 0.5
    b, s, t = (torch.randn(cout, device="cuda", dtype=dtype) for _ in range(3))
    return cs, rs, w, b, s, t


def _bench_layer(name, kind, dims, batch, streams, dtype, precision):
    from cure_fast import _cuda
    from cure_fast.reference import interval_conv2d_ref, interval_linear_ref

    cs, rs, w, b, s, t = _layer(kind, dims, batch, streams, dtype)
    geom = dims[3:5] if kind == "conv" else ()
    it = {"i": 0}

    def pick():
        it["i"] = (it["i"] + 1) % len(cs)
        return cs[it["i"]], rs[it["i"]]

    def cuda_fwd(method="auto"):
        c, r = pick()
        if kind == "conv":
            return _cuda.interval_conv2d(c, r, w, b, *geom, scale=s, shift=t, relu=True, precision=precision,
                                         method=method)
        return _cuda.interval_linear(c, r, w, b, scale=s, shift=t, relu=True, precision=precision)

    def torch_fwd():
        c, r = pick()
        if kind == "conv":
            co, ro = interval_conv2d_ref(c, r, w, b, *geom)
            shape = (1, -1, 1, 1)
        else:
            co, ro = interval_linear_ref(c, r, w, b)
            shape = (1, -1)
        co, ro = co * s.view(shape) + t.view(shape), ro * s.abs().view(shape)
        p = co.shape[0] - ro.shape[0]
        lo, up = (co[p:] - ro).relu(), (co[p:] + ro).relu()
        return torch.cat([co[:p].relu(), (up + lo) / 2]), (up - lo) / 2

    w_abs = w.abs()

    def floor_fwd():
        c, r = pick()
        if kind == "conv":
            return F.conv2d(c, w, None, *geom), F.conv2d(r, w_abs, None, *geom)
        return c @ w.t(), r @ w_abs.t()

    def with_backward(fwd):
        def run():
            for p in (w, b, s, t):
                p.requires_grad_(True)
            c, r = pick()
            c.requires_grad_(True)
            r.requires_grad_(True)
            outs = fwd()
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            for x in (w, b, s, t, c, r):
                x.grad = None
                x.requires_grad_(False)
        return run

    ieee = precision == "ieee"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not ieee
    try:
        row = {"layer": name, "kind": kind, "dims": list(dims), "rows_c": cs[0].shape[0], "rows_r": rs[0].shape[0]}
        runs = [("cuda", cuda_fwd), ("torch", torch_fwd), ("floor", floor_fwd)]
        if kind == "conv":
            runs += [(label, lambda method=method: cuda_fwd(method))
                     for label, method in (("igemm", "implicit_gemm"), ("cudnn", "cudnn"))]
        for label, fn in runs:
            with torch.no_grad():
                row[f"{label}_fwd_ms"] = _median_ms(fn)
        for label, fn in runs:
            row[f"{label}_fwd_bwd_ms"] = _median_ms(with_backward(fn))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    row["speedup_vs_torch_fwd"] = row["torch_fwd_ms"] / row["cuda_fwd_ms"]
    row["ratio_to_floor_fwd"] = row["cuda_fwd_ms"] / row["floor_fwd_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images per stream")
    parser.add_argument("--streams", type=int, default=3, help="natural + input sets (natural + l∞ + l2 = 3)")
    parser.add_argument("--precision", default="ieee", choices=["ieee", "tf32", "bf16"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; nothing to measure (the cuda backend runs on GPUs only)")
        return 0
    from cure_fast import _cuda
    _cuda.extension()  # a clear error when the extension is missing or stale
    dtype = getattr(torch, args.dtype)
    rows = [_bench_layer(name, kind, dims, args.batch, args.streams, dtype, args.precision)
            for name, kind, dims in LAYERS]
    header = f"{'layer':8s} {'cuda':>9s} {'torch':>9s} {'floor':>9s} {'x torch':>8s} {'/floor':>7s} " \
             f"{'cuda f+b':>9s} {'torch f+b':>9s} {'floor f+b':>9s} {'igemm':>9s} {'cudnn':>9s} {'igemm f+b':>9s} " \
             f"{'cudnn f+b':>9s}"
    print(f"CNN7 per layer, batch {args.batch} x {args.streams} streams, {args.dtype}, precision {args.precision}, "
          f"{torch.cuda.get_device_name()} (ms, median)")
    print(header)
    for r in rows:
        methods = " ".join(f"{r[key]:9.3f}" if key in r else f"{'-':>9s}"
                           for key in ("igemm_fwd_ms", "cudnn_fwd_ms", "igemm_fwd_bwd_ms", "cudnn_fwd_bwd_ms"))
        print(f"{r['layer']:8s} {r['cuda_fwd_ms']:9.3f} {r['torch_fwd_ms']:9.3f} {r['floor_fwd_ms']:9.3f} "
              f"{r['speedup_vs_torch_fwd']:8.2f} {r['ratio_to_floor_fwd']:7.2f} {r['cuda_fwd_bwd_ms']:9.3f} "
              f"{r['torch_fwd_bwd_ms']:9.3f} {r['floor_fwd_bwd_ms']:9.3f} {methods}")
    result = {
        "benchmark": "bench_cuda", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "batch": args.batch, "streams": args.streams, "dtype": args.dtype,
        "precision": args.precision, "layers": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
