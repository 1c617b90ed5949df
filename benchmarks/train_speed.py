"""CPU cost of one training step of `ladder-dn121` (11 classes, Adam, ladder loss): the previous
defaults of `bigseg train`, each change alone, and the new defaults together, in one run.

    python benchmarks/train_speed.py [--batch 8] [--crop 320] [--warmup 3] [--steps 3] [--only NAME,...] [--busy]

Each variant runs in a fresh process (OpenMP reads its wait policy and glibc its thresholds at
start-up) on the same synthetic batch: `--warmup` steps (the allocator reaches its steady state
after two or three), then `--steps` timed steps. CPU s/step is
the process's user + system time per step (all threads), wall s/step the elapsed time; "sys" is
the kernel's share (page faults of freshly mapped activations). `--busy` runs one busy process
beside each variant, as on a shared machine, where spinning OpenMP threads lose most.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# name: (environment, settings); the first is the baseline (bigseg train's defaults before)
BEFORE = {"grad_checkpoint": True, "allocator": False, "channels_last": False, "precision": "fp32",
          "compile": False, "crop": None, "lovasz": 0.0}
NEW = {**BEFORE, "grad_checkpoint": False, "allocator": True, "channels_last": True}
VARIANTS = {
    "before (spinning threads, checkpointing)": ({}, BEFORE),
    "passive thread waiting": ({"OMP_WAIT_POLICY": "PASSIVE"}, BEFORE),
    "no gradient checkpointing": ({}, {**BEFORE, "grad_checkpoint": False}),
    "allocator keeps freed memory": ({}, {**BEFORE, "allocator": True}),
    "channels-last": ({}, {**BEFORE, "channels_last": True}),
    "bf16 autocast": ({}, {**BEFORE, "precision": "bf16"}),
    "new defaults together": ({"OMP_WAIT_POLICY": "PASSIVE"}, NEW),
    "new defaults + 192 px crops (schedule's first phase)": ({"OMP_WAIT_POLICY": "PASSIVE"}, {**NEW, "crop": 192}),
    "new defaults + --compile": ({"OMP_WAIT_POLICY": "PASSIVE"}, {**NEW, "compile": True}),
    "new defaults + --lovasz 1 (a loss, not a speed-up)": ({"OMP_WAIT_POLICY": "PASSIVE"}, {**NEW, "lovasz": 1.0}),
}


def run_variant(settings: dict, batch: int, crop: int, warmup: int, steps: int) -> dict:
    """Time training steps in this process (the environment is already set by the parent)."""
    from bigseg.runtime import keep_freed_memory

    if settings["allocator"]:
        keep_freed_memory()
    import torch

    from bigseg.models import create_model
    from bigseg.models.blocks import set_grad_checkpointing
    from bigseg.train.losses import model_loss

    crop = settings["crop"] or crop
    torch.manual_seed(0)
    net = create_model("ladder-dn121", 11)
    set_grad_checkpointing(net, settings["grad_checkpoint"])
    layout = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    net.to(memory_format=layout).train()
    model = torch.compile(net) if settings["compile"] else net
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=layout)
    y = torch.randint(0, 11, (batch, crop, crop))
    bf16 = settings["precision"] == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, aux = model(x, return_aux=True)
        loss, _ = model_loss(net, logits, aux, y, 0.5, 0.4, lovasz=settings["lovasz"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"crop": crop, "wall_s": wall / steps, "cpu_s": (user + system) / steps, "sys_share": system / max(user + system, 1e-9),
            "warmup_s": warmup_s, "peak_rss_mib": r1.ru_maxrss / 1024}


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of the variant names to run")
    p.add_argument("--busy", action="store_true", help="run one busy process beside each variant")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(json.loads(args.variant), args.batch, args.crop, args.warmup, args.steps)))
        return
    wanted = [w for w in args.only.split(",") if w]
    names = [n for n in VARIANTS if not wanted or any(w in n for w in wanted)]
    rows = []
    for name in names:
        env, settings = VARIANTS[name]
        child_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        child_env.update(env)
        load = busy_process() if args.busy else None
        try:
            done = subprocess.run([sys.executable, __file__, "--variant", json.dumps(settings), "--batch",
                                   str(args.batch), "--crop", str(args.crop), "--warmup", str(args.warmup), "--steps", str(args.steps)],
                                  env=child_env, capture_output=True, text=True)
        finally:
            if load is not None:
                load.kill()
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((name, json.loads(done.stdout.strip().splitlines()[-1])))
        print(f"  {name}: {rows[-1][1]}", file=sys.stderr, flush=True)
    if not rows:
        return
    base = rows[0][1]
    print(f"ladder-dn121, batch {args.batch}, {os.cpu_count()} cores{', one busy process beside' if args.busy else ''}; "
          f"{args.steps} timed steps after {args.warmup} warm-up steps; x = baseline CPU s / variant CPU s")
    print("| variant | crop | CPU s/step | x faster (CPU) | wall s/step | x faster (wall) | kernel share | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['crop']} | {r['cpu_s']:.2f} | {base['cpu_s'] / r['cpu_s']:.2f} | {r['wall_s']:.2f} | "
              f"{base['wall_s'] / r['wall_s']:.2f} | {100 * r['sys_share']:.0f}% | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
