#!/usr/bin/env python
"""The fast-compute targets, met or missed, from the measurements on disk.

    python -m experiments.targets docs/results/bench/bench.json docs/results/throughput/small-long/throughput.json
    python -m experiments.targets OUT/gpu_check.tgz   # the archive of the GPU suite (experiments/gpu/run.sh)

Each PATH is a bench.json (adaptive-moe-bench), a throughput.json (``experiments.throughput``), a
folder searched for both, or a gpu_check.tgz. Prints one markdown table: each target with the figure that
decides it and its run's machine, "met" or "missed", or "not measured" where no run fits (a GPU
target needs a CUDA bf16 bench at the paper's shape, the CPU target a bench at the CPU mode's
shape, the end-to-end target a ``--gpu`` throughput run); where several fit, the last decides. Below
it, figures with no target of their own: the layer under fairseq's
``--fp16`` (fp16 weights, bf16 GEMMs) against bf16, the trimmed plan and the compiled and graphed
variants against ``ours``. ``--json`` prints the rows as JSON instead.

Exit status 0 whatever the verdicts; 2 (one line on stderr) for a path that is not one of the above.
"""

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from fairseq_adaptive_moe.tools.bench import PRESETS

PROG = "targets.py"
SHAPE_KEYS = ("experts", "dim", "ffn")
F_SINGLE = 0.8  # the targets' fraction of single-expert tokens


class BadInput(Exception):
    pass


def load(paths: List[Path], tmp: Path, shown: Optional[Path] = None) -> Dict[str, list]:
    """{"bench": [bench.json dicts], "throughput": [throughput.json dicts]}; each with "_path"
    (inside an archive: ``ARCHIVE:member``)."""
    found: Dict[str, list] = {"bench": [], "throughput": []}

    def add(path: Path):
        name = f"{shown}:{path.relative_to(tmp / shown.name)}" if shown else str(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise BadInput(f"{path}: not readable JSON ({err})")
        if "records" in data and "meta" in data:
            found["bench"].append(dict(data, _path=name))
        elif "runs" in data and "ratio_to_first" in data:
            found["throughput"].append(dict(data, _path=name))
        else:
            raise BadInput(f"{path}: neither a bench.json nor a throughput.json")

    for i, path in enumerate(paths):
        if not path.exists():
            raise BadInput(f"{path}: no such file or folder")
        if path.is_dir():
            hits = sorted(path.rglob("bench.json")) + sorted(path.rglob("throughput.json"))
            if not hits:
                raise BadInput(f"{path}: holds no bench.json or throughput.json")
            for hit in hits:
                add(hit)
        elif path.name.endswith((".tgz", ".tar.gz")):
            dest = tmp / f"{i}" / path.name
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(dest, filter="data")
            except (tarfile.TarError, OSError) as err:
                raise BadInput(f"{path}: not a readable archive ({str(err).splitlines()[0]})")
            found_here = load([dest], tmp / f"{i}", shown=path)
            for key in found:
                found[key] += found_here[key]
        else:
            add(path)
    return found


def _record(bench: dict, impl: str, tokens: Optional[int], fraction: float) -> Optional[dict]:
    for r in bench["records"]:
        if r["impl"] == impl and (tokens is None or r["tokens"] == tokens) and r["fraction"] == fraction:
            return r
    return None


def _shape_of(bench: dict, preset: str) -> bool:
    """The bench ran at a preset's shape (``cuda``: the paper's; ``cpu``: the CPU mode's)."""
    return all(bench["meta"].get(k) == PRESETS[preset][k] for k in SHAPE_KEYS)


def _paper_shape(bench: dict) -> bool:
    return _shape_of(bench, "cuda")


def _gpu_bf16(bench: dict) -> bool:
    meta = bench["meta"]
    return meta["device"] == "cuda" and meta["dtype"] == "bfloat16" and _paper_shape(bench)


def _machine(run: dict) -> str:
    return run.get("meta", {}).get("machine") or run.get("machine", "?")


def bench_target(name: str, benches: list, keep: Callable[[dict], bool], tokens: Optional[int],
                 target: float, impl: str = "ours") -> dict:
    """f+b time at F_SINGLE over the same implementation's top-2 time, target an upper bound."""
    row = dict(measurement=name, target=f"<= {target:.2f}x top-2", figure=None, verdict="not measured",
               source=None)
    for bench in benches:
        if not keep(bench):
            continue
        r = _record(bench, impl, tokens, F_SINGLE)
        if r is None or r.get("fwdbwd_ratio") is None:
            continue
        ratio = r["fwdbwd_ratio"]
        row.update(figure=f"{ratio:.3f}x ({impl}, {r['tokens']} tokens)",
                   verdict="met" if ratio <= target else "missed",
                   source=f"{bench['_path']} ({_machine(bench)})", value=ratio)
    return row


def tflops_target(benches: list, tokens: int, target: float) -> dict:
    row = dict(measurement=f"top-2 throughput at {tokens // 1024}k tokens (GPU bf16, fwd+bwd)",
               target=f">= {target:.0f} TFLOP/s", figure=None, verdict="not measured", source=None)
    for bench in benches:
        if not _gpu_bf16(bench):
            continue
        r = _record(bench, "ours", tokens, 0.0)
        if r is None:
            continue
        tf = r["fwdbwd_tflops"]
        row.update(figure=f"{tf:.0f} TFLOP/s", verdict="met" if tf >= target else "missed",
                   source=f"{bench['_path']} ({_machine(bench)})", value=tf)
    return row


def e2e_target(runs: list, target: float) -> dict:
    row = dict(measurement="end-to-end words/s, adaptive vs top2 (GPU)", target=f">= {target:.2f}x",
               figure=None, verdict="not measured", source=None)
    for run in runs:
        if "--gpu" not in run.get("command", []) or "adaptive" not in run["ratio_to_first"]:
            continue
        if run.get("schemes", ["top2"])[0] != "top2":
            continue
        ratio = run["ratio_to_first"]["adaptive"]
        two = run["runs"]["adaptive"].get("moe_2x")
        row.update(figure=f"{ratio:.3f}x" + (f" (two-expert {100 * two:.0f}%)" if two is not None else ""),
                   verdict="met" if ratio >= target else "missed",
                   source=f"{run['_path']} ({_machine(run)})", value=ratio)
    return row


def targets(found: Dict[str, list]) -> List[dict]:
    """The issue's targets, in its order."""
    benches = found["bench"]

    def cpu_fp32(b):
        return b["meta"]["device"] == "cpu" and b["meta"]["dtype"] == "float32" and _shape_of(b, "cpu")

    return [
        bench_target("GPU bf16, 16k tokens, 80% single-expert", benches, _gpu_bf16, 16384, 0.62),
        bench_target("GPU bf16, 64k tokens, 80% single-expert", benches, _gpu_bf16, 65536, 0.61),
        bench_target("GPU bf16, 4k tokens, 80% single-expert", benches, _gpu_bf16, 4096, 0.75),
        tflops_target(benches, 65536, 550),
        bench_target("CPU fp32, 80% single-expert", benches, cpu_fp32, None, 0.72),
        e2e_target(found["throughput"], 1.35),
    ]


def side_figures(found: Dict[str, list]) -> List[str]:
    """Figures with no target: fp16 weights vs bf16, and the other plans against ours (top-2 and
    f = 0.8, fwd+bwd ms), per token count, on the GPU."""
    lines = []

    def versus(label: str, r: dict, base: dict) -> str:
        return (f"- {label}, {r['tokens']} tokens, f={r['fraction']:g}: {r['fwdbwd_ms']:.2f} ms vs "
                f"{base['fwdbwd_ms']:.2f} ms ({r['fwdbwd_ms'] / base['fwdbwd_ms']:.2f}x)")

    gpu = [b for b in found["bench"] if b["meta"]["device"] == "cuda" and _paper_shape(b)]
    bf16 = [b for b in gpu if b["meta"]["dtype"] == "bfloat16"]
    fp16 = [b for b in gpu if b["meta"]["dtype"] == "float16"]
    for half in fp16:
        for r in half["records"]:
            if r["impl"] != "ours" or r["fraction"] not in (0.0, F_SINGLE):
                continue
            base = next(filter(None, (_record(b, "ours", r["tokens"], r["fraction"]) for b in bf16)),
                        None)
            if base:
                lines.append(versus("fp16 weights (fairseq --fp16) vs bf16", r, base))
    for b in bf16:
        for impl in ("ours_trimmed", "ours_graphed", "ours_compiled"):
            for r in b["records"]:
                if r["impl"] != impl or r["fraction"] not in (0.0, F_SINGLE):
                    continue
                base = _record(b, "ours", r["tokens"], r["fraction"])
                if base:
                    lines.append(versus(f"{impl} vs ours", r, base))
    return lines


def render(rows: List[dict], side: List[str]) -> str:
    out = ["| measurement | target | figure | verdict | run |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['measurement']} | {r['target']} | {r['figure'] or '-'} | {r['verdict']} "
                   f"| {r['source'] or '-'} |")
    if side:
        out += ["", "Figures with no target (fwd+bwd):"] + side
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="bench.json, throughput.json, a folder holding them, or a gpu_check.tgz")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            found = load(args.paths, Path(tmp))
        except BadInput as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        rows, side = targets(found), side_figures(found)
    if args.json:
        print(json.dumps(dict(targets=rows, side=side), indent=1))
    else:
        print(render(rows, side), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
