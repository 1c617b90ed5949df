"""Gradient checkpointing for `ladder-dn121`: activation memory kept for backward, peak memory and
step time per training step, plain versus checkpointed, in one run (the plain step is the baseline).

    python benchmarks/train_memory.py [--size 768] [--batch 2] [--device cpu|cuda] [--steps 2]

Variants: plain; dense units + transitions (the authors' default); + stem; everything bigseg
checkpoints by default (also SPP and transition-up blocks). "Saved" counts the unique storage
of tensors autograd keeps for backward (as the reference measurement in ../shared/MODELS.md
does); peak is the process's peak RSS (CPU, each variant in a fresh process) or
torch.cuda.max_memory_allocated (GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("plain", "dense", "dense+stem", "all")


def run_variant(variant: str, size: int, batch: int, device: str, steps: int) -> dict:
    import torch

    from bigseg.models import create_model
    from bigseg.models.blocks import set_grad_checkpointing
    from bigseg.models.densenet import DenseLayer, Features, Transition
    from bigseg.train.losses import ladder_loss

    torch.manual_seed(0)
    model = create_model("ladder-dn121", 19).to(device).train()
    only = {"plain": None, "dense": (DenseLayer, Transition), "dense+stem": (DenseLayer, Transition, Features),
            "all": ()}[variant]
    if only is not None:
        set_grad_checkpointing(model, True, only)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 19, (batch, size, size), device=device)
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    times = []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits, aux = model(x, return_aux=True)
            saved = sum(seen.values())
            seen.clear()
        else:
            logits, aux = model(x, return_aux=True)
        loss, _ = ladder_loss(logits, aux, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # step 0 warms up (and measures saved tensors)
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else None)
    return {"variant": variant, "saved_mib": saved / 2**20, "step_s": sum(times) / len(times),
            "peak_cuda_mib": None if peak is None else peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, result as JSON on stdout
        print(json.dumps(run_variant(args.variant, args.size, args.batch, args.device, args.steps)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--size", str(args.size), "--batch",
               str(args.batch), "--device", args.device, "--steps", str(args.steps)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"variant {variant} failed")
        row = json.loads(proc.stdout.read().strip().splitlines()[-1])
        row["peak_rss_mib"] = usage.ru_maxrss / 1024
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    base = rows[0]
    print(f"\nladder-dn121, batch {args.batch}, {args.size}x{args.size}, {args.device}")
    print(f"{'variant':<11} {'saved MiB':>10} {'x less':>7} {'peak MiB':>9} {'x less':>7} {'step s':>7} {'x time':>7}")
    for r in rows:
        peak = r["peak_cuda_mib"] or r["peak_rss_mib"]
        base_peak = base["peak_cuda_mib"] or base["peak_rss_mib"]
        print(f"{r['variant']:<11} {r['saved_mib']:10.0f} {base['saved_mib'] / r['saved_mib']:7.2f} "
              f"{peak:9.0f} {base_peak / peak:7.2f} {r['step_s']:7.2f} {r['step_s'] / base['step_s']:7.2f}")


if __name__ == "__main__":
    main()
