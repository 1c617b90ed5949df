"""CPU seconds per megapixel of bare models (no reading, stitching or writing), per engine and
precision, against `ladder-dn121` in the same run: torch fp32 and bf16 autocast, OpenVINO fp32 and
bf16 on the same fp32 export. Random weights (the cost does not depend on them), 11 classes, one
TILE x TILE tile a call; calls interleaved across models and engines, best of `--rounds`.

    python benchmarks/model_speed.py --models ladder-dn121,swiftnet-lite0,swiftnet-lite1,swiftnet-lite2
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
from pathlib import Path

import torch

from bigseg.infer.cache import native_bf16
from bigseg.infer.engines.export import ExportCache
from bigseg.infer.engines.exported import ExportedModel
from bigseg.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from cpu_predict_seconds import cpu_kind  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ladder-dn121,swiftnet-lite0,swiftnet-lite1,swiftnet-lite2")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    names = args.models.split(",")
    bf16 = native_bf16()
    print(f"CPU: {cpu_kind()}; {torch.get_num_threads()} threads; bf16 units: {bf16}", flush=True)
    x = torch.randn(1, 3, args.tile, args.tile)
    runs = {}
    folder = Path(tempfile.mkdtemp(prefix="bigseg-speed-"))
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, 11).eval().to(memory_format=torch.channels_last)
        identity = {"arch": name, "benchmark": "model_speed"}
        for precision in ("f32", "bf16"):
            engine = ExportedModel(model, ExportCache(identity, 3, folder), ("openvino",), torch.get_num_threads(),
                                   lambda n: None, precision=precision, multiple=getattr(model, "output_multiple", 1))
            engine(x)  # export (once per model) and compile
            runs[(name, f"openvino {precision}")] = lambda e=engine: e(x)
        for precision in ("fp32", "bf16"):
            def in_torch(m=model, p=precision):
                with torch.autocast("cpu", torch.bfloat16, enabled=p == "bf16"):
                    m(x.contiguous(memory_format=torch.channels_last))
            runs[(name, f"torch {precision}")] = in_torch
        print(f"{name}: exported", flush=True)
    best = dict.fromkeys(runs, math.inf)
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up
        for r in range(args.rounds):
            for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                start = cpu_seconds()
                runs[key]()
                best[key] = min(best[key], cpu_seconds() - start)
    mp = args.tile ** 2 / 1e6
    engines = sorted({e for _, e in runs})
    print(f"CPU s per MP ({args.tile}px tiles; in brackets: x ladder-dn121's in the same engine)")
    print(f"{'model':<18}" + "".join(f"{e:>22}" for e in engines))
    base = names[0]
    for name in names:
        cells = []
        for e in engines:
            value = best[(name, e)] / mp
            ratio = best[(name, e)] / best[(base, e)]
            cells.append(f"{value:10.3f} ({ratio:5.2f}x)")
        print(f"{name:<18}" + "".join(f"{c:>22}" for c in cells))
    if not bf16:
        print("no bf16 units here: OpenVINO bf16 ran in fp32, torch bf16 was emulated")


if __name__ == "__main__":
    main()
