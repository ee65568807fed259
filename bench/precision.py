"""INT8 against FP32 against the course-starter pattern, in one run (`python -m bench --model DIR`).

DIR is a model folder as `app.train --int8` writes it: export.pkl, bundle/ (FP32) and bundle-int8/.
The three are served side by side on free loopback ports and loaded by the same load generator with
the same photo at 1, 8 and 32 clients; the INT8 service is compared with its own bare forward pass
in alternating rounds. Then both bundles answer photos they never saw (`../shared/data/in-context`,
whose sources no training photo came from, and `../shared/data/not-bears`): accuracy, the
unfamiliar-image detector's flagged rates, and real bears answered "teddys" without the flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.bare import in_own_process
from bench.bare import rate_in_own_process as bare
from bench.servers import ROOT, LoadResult, Server, start_baseline, start_ours

SHARED = ROOT.parent / "shared" / "data"
BATCH = 8  # the service's MAX_BATCH default


def serving(folder: Path, image: Path, levels: list[int], seconds: float, max_requests: int) -> list[str]:
    servers: dict[str, Server] = {}
    results: dict[tuple[str, int], LoadResult] = {}
    try:
        servers["INT8 bundle"] = start_ours(folder / "bundle-int8")
        servers["FP32 bundle"] = start_ours(folder / "bundle")
        servers["course starter"] = start_baseline(folder / "export.pkl")
        for c in levels:
            for name, server in servers.items():
                results[(name, c)] = LoadResult.run(server, image, c, seconds, max_requests)
        rounds = [(in_own_process(folder / "bundle-int8" / "model.onnx", BATCH),
                   LoadResult.run(servers["INT8 bundle"], image, levels[-1], seconds, max_requests)) for _ in range(3)]
        fp32_bare = bare(folder / "bundle" / "model.onnx", BATCH)
        int8_one = bare(folder / "bundle-int8" / "model.onnx", 1)
        rss = {name: server.peak_rss_mb() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    lines = ["| server | clients | p50 ms | p99 ms | req/s | ok | errors | CPU ms/req server + load gen. |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for (name, c), r in results.items():
        lines.append(f"| {name} | {c} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.rps:.1f} | {r.ok} | {r.errors or '-'} | "
                     f"{r.server_cpu_ms:.1f} + {r.client_cpu_ms:.1f} |")
    lines.append("")
    top, starter = levels[-1], "course starter"
    for name in ("INT8 bundle", "FP32 bundle"):
        lower = results[(starter, 1)].p50_ms / results[(name, 1)].p50_ms
        faster = results[(name, top)].rps / results[(starter, top)].rps
        lines.append(f"{name}: p50 at 1 client {lower:.1f}x lower than the course starter's; at {top} clients "
                     f"{faster:.1f}x its throughput; peak RSS {rss[name]:.0f} MB (starter {rss[starter]:.0f} MB)")
    ratios = [load.rps / figures["rate"] for figures, load in rounds]
    lines.append(f"INT8 bundle at {top} clients against its bare forward pass at batch {BATCH}, alternating rounds: "
                 + "; ".join(f"{load.rps:.0f} req/s vs {figures['rate']:.0f} img/s" for figures, load in rounds)
                 + f" (median {sorted(ratios)[1]:.0%}); bare FP32 at batch {BATCH} {fp32_bare:.0f} img/s, "
                   f"INT8 at batch 1 {int8_one:.0f} img/s")
    figures, load = rounds[ratios.index(sorted(ratios)[1])]
    lines.append(f"CPU per image in that round: the bare INT8 pass {figures['cpu_ms']:.1f} ms; the INT8 service "
                 f"{load.server_cpu_ms:.1f} ms in the server + {load.client_cpu_ms:.1f} ms in the load generator, on "
                 f"the same {os.cpu_count()} cores")
    return lines


def answers(folder: Path) -> list[str]:
    """Both bundles on photos they never saw: accuracy, flagged rates, bears answered teddys unflagged."""
    from app.building.datasets import image_files
    from app.building.measure import predict_files
    from app.core.bundle import load_bundle

    threads = os.cpu_count() or 1
    bundles = {"FP32": load_bundle(folder / "bundle", threads), "INT8": load_bundle(folder / "bundle-int8", threads)}
    classes = bundles["FP32"].manifest.classes
    sets: dict[str, list[Path]] = {}
    if (SHARED / "in-context").is_dir():
        sets["in-context, classes"] = [p for cls in classes for p in image_files(SHARED / "in-context" / cls)]
        sets["in-context, no bear"] = image_files(SHARED / "in-context" / "not-bear", recursive=True)
    if (SHARED / "not-bears").is_dir():
        sets["not-bears"] = image_files(SHARED / "not-bears", recursive=True)
    lines = ["| photos | n | " + " | ".join(f"{name} accuracy | {name} flagged" for name in bundles) + " |",
             "|---|---:|" + "---:|---:|" * len(bundles)]
    teddys = classes.index("teddys") if "teddys" in classes else None
    unflagged_bears = {}
    for label, files in sets.items():
        row = [label, str(len(files))]
        for name, bundle in bundles.items():
            out = predict_files(bundle.predictor, bundle.detector, files)
            predicted = out.probs.argmax(1)
            flags = out.unfamiliar if out.unfamiliar is not None else np.zeros(len(predicted), bool)
            if "classes" in label:
                targets = np.array([classes.index(p.parent.name) for p in out.files])
                row.append(f"{(predicted == targets).mean():.2%}")
                if teddys is not None:
                    bear = targets != teddys
                    unflagged_bears[name] = int((bear & (predicted == teddys) & ~flags).sum())
                for i, cls in enumerate(classes):
                    row[-1] += f"; {cls} flagged {flags[targets == i].mean():.1%}" if (targets == i).any() else ""
                row.append(f"{flags.mean():.1%}")
            else:
                row.extend(["-", f"{flags.mean():.1%}"])
        lines.append("| " + " | ".join(row) + " |")
    for name, count in unflagged_bears.items():
        lines.append(f"{name}: real bears of new sources answered teddys without the unfamiliar flag: {count}")
    for name, bundle in bundles.items():
        agreement = bundle.manifest.agreement
        if agreement:
            lines.append(f"{name} manifest, validation split: top-1 agreement {agreement['top1_agreement']:.2%}, "
                         f"accuracy {agreement['accuracy']}, flagged {agreement['flagged_rate']}")
    return lines


def compare(folder: Path, image: Path, levels: list[int], seconds: float, max_requests: int) -> list[str]:
    if (folder / "export.pkl").is_file() and not (folder / "bundle").is_dir():  # the FP32 bundle needs no data
        subprocess.run([sys.executable, "-m", "app.compile", str(folder / "export.pkl"), "--out",
                        str(folder / "bundle")], cwd=ROOT, check=True, capture_output=True)
    missing = [name for name in ("export.pkl", "bundle", "bundle-int8") if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"{folder} has no {', '.join(missing)}: make them with python -m app.train DATA --int8 "
                         f"--out {folder}, or python -m app.compile EXPORT --int8 --calibration DATA --out "
                         f"{folder}/bundle-int8")
    return [f"\n## INT8 vs FP32 vs the course starter: {folder}",
            *serving(folder, image, levels, seconds, max_requests), "", *answers(folder)]
