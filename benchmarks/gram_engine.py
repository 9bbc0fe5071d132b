"""Benchmark of the Gram engine against materialized V, curvlinops + eigsh, and the exact GGN.

Each (problem, N, method) case runs in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``) belongs to that case alone. The Gram methods first run once on 2 samples to
exclude BackPACK's one-time setup. Times are in units of one gradient evaluation
(forward and backward pass of the mean loss with plain autograd) measured in the same process.

    python benchmarks/gram_engine.py                 # the grid of RESULTS.md
    python benchmarks/gram_engine.py --quick         # MLP and 2c2d at N=32 only

Requires the ``benchmark`` extra (curvlinops-for-pytorch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = ["engine", "materialized", "engine_topk", "curvlinops_topk", "exact"]
ALL = METHODS
FULL = ["engine", "materialized"]
TOP = ["engine", "materialized", "engine_topk", "curvlinops_topk"]
# (problem, N, methods) of the default grid, cut to finish in about ten minutes on two shared
# cores. Left out: N=128 and N=256 for All-CNN-C (C=100, Gram matrices of 12800² and more),
# curvlinops + eigsh except at N=32 (it needs over 100 gradient evaluations there), and the exact
# GGN above D = EXACT_MAX_PARAMS and at N=256.
GRID = [
    ("mlp_digits", 32, ALL),
    ("mlp_digits", 128, ["engine", "materialized", "engine_topk", "exact"]),
    ("mlp_digits", 256, FULL),
    ("fmnist_2c2d", 32, FULL),
    ("fmnist_2c2d", 128, FULL),
    ("fmnist_2c2d", 256, FULL),
    ("cifar10_3c3d", 32, TOP),
    ("cifar10_3c3d", 128, ["engine", "materialized", "engine_topk"]),
    ("cifar10_3c3d", 256, FULL),
    ("cifar100_allcnnc", 32, FULL),
]
QUICK_GRID = [("mlp_digits", 32, ALL), ("fmnist_2c2d", 32, TOP)]
TOP_K = 10
# BackPACK's whole slice of V for the largest parameter must stay below this, because the machine
# is shared (its peak is about twice the slice).
MATERIALIZED_MAX_GB = 4.2
QUICK_SECONDS = 3.0
# The exact GGN is built only up to this many parameters (D² float64 entries plus the Jacobian).
EXACT_MAX_PARAMS = 5000


def build_problem(name: str, num_samples: int):
    """Return model, loss, inputs and targets; random inputs of the data set's shape, seed 0."""
    import torch
    from torch import nn

    from harness import models

    torch.manual_seed(0)
    if name == "mlp_digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        inputs = torch.tensor(digits.data[:num_samples] / 16.0, dtype=torch.float32)
        labels = torch.tensor(digits.target[:num_samples])
        return models.mlp(64, [32], 10, "relu"), nn.CrossEntropyLoss(), inputs, labels
    shapes = {
        "fmnist_2c2d": (models.deepobs_2c2d, (1, 28, 28), 10),
        "cifar10_3c3d": (models.deepobs_3c3d, (3, 32, 32), 10),
        "cifar100_allcnnc": (models.deepobs_allcnnc, (3, 32, 32), 100),
    }
    build, shape, classes = shapes[name]
    model = build(shape[0], classes).eval()
    inputs = torch.rand(num_samples, *shape)
    labels = torch.randint(0, classes, (num_samples,))
    return model, nn.CrossEntropyLoss(), inputs, labels


def gradient_seconds(model, loss_func, inputs, labels, budget: float = 2.0, max_repeats: int = 21) -> float:
    """Median time of one gradient evaluation with plain autograd, after one untimed evaluation.

    It repeats until ``budget`` seconds have passed (at least 3, at most ``max_repeats`` times),
    so that the sub-millisecond gradient of the MLP is not one preempted sample.
    """
    loss_func(model(inputs), labels).backward()
    times = []
    while len(times) < 3 or (sum(times) < budget and len(times) < max_repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_func(model(inputs), labels).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def run_method(method: str, model, loss_func, inputs, labels):
    """Run one method and return its eigenvalues, descending (top-k methods: only k)."""
    import torch

    from harness.curvature import compute_curvature, compute_grams, exact_ggn, gram_eigvals

    params = list(model.parameters())
    if method == "engine":
        result = compute_curvature(model, loss_func, inputs, labels, {"all": params}, dtype=torch.float32)
        return result["all"].eigvals
    if method == "engine_topk":
        result = compute_curvature(model, loss_func, inputs, labels, {"all": params}, dtype=torch.float32, top_k=TOP_K)
        return result["all"].selected
    if method == "materialized":
        grams = compute_grams(
            model, loss_func, inputs, labels, {"all": params}, dtype=torch.float32, path="materialized", reduced_factor=False
        )
        return gram_eigvals(grams["all"])
    if method == "curvlinops_topk":
        from curvlinops import GGNLinearOperator
        from scipy.sparse.linalg import eigsh

        operator = GGNLinearOperator(model, loss_func, params, [(inputs, labels)], check_deterministic=False).to_scipy()
        eigvals = eigsh(operator, k=TOP_K, which="LA", return_eigenvectors=False)
        return torch.from_numpy(eigvals.copy()).sort(descending=True).values
    if method == "exact":
        ggn = exact_ggn(model, loss_func, inputs, labels, params)
        return torch.linalg.eigvalsh(ggn).flip(0)
    raise ValueError(f"Unknown method {method!r}: use one of {METHODS}.")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(problem: str, num_samples: int, method: str) -> dict:
    """Run one case in this process and return its measurements (called in the subprocess)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, loss_func, inputs, labels = build_problem(problem, num_samples)
    num_params = sum(p.numel() for p in model.parameters())
    if method == "exact" and num_params > EXACT_MAX_PARAMS:
        return {"skipped": f"D={num_params} > {EXACT_MAX_PARAMS}"}
    if method == "exact":
        model, inputs = model.double(), inputs.double()
    if method == "materialized":
        classes = model(inputs[:1]).shape[1]
        slice_gb = classes * num_samples * max(p.numel() for p in model.parameters()) * 4 / 1e9
        if slice_gb > MATERIALIZED_MAX_GB:
            return {"skipped": f"largest V slice {slice_gb:.2f} GB > {MATERIALIZED_MAX_GB} GB"}

    gradient = gradient_seconds(model, loss_func, inputs, labels)
    if method in ("engine", "engine_topk", "materialized"):
        # BackPACK's first backward pass compiles and imports helpers (seconds); keep that out.
        run_method(method, model, loss_func, inputs[:2], labels[:2])
    rss_before = current_rss_mb()
    start = time.perf_counter()
    eigvals = run_method(method, model, loss_func, inputs, labels)
    times = [time.perf_counter() - start]
    # On a shared machine one short run is mostly noise, so those get the median of 3.
    while times[0] < QUICK_SECONDS and len(times) < 3:
        start = time.perf_counter()
        run_method(method, model, loss_func, inputs, labels)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "num_params": num_params,
        "seconds": seconds,
        "gradient_seconds": gradient,
        "gradients": seconds / gradient,
        "peak_rss_mb": peak_mb,
        "peak_increase_mb": peak_mb - rss_before,
        "eigvals": eigvals.double().tolist(),
    }


def spawn_case(problem: str, num_samples: int, method: str, timeout: float) -> dict:
    """Run one case in a fresh Python process; return its measurements or the failure."""
    command = [sys.executable, __file__, "--case", problem, str(num_samples), method]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if finished.returncode != 0:
        return {"skipped": f"failed: {finished.stderr.strip().splitlines()[-1][:120]}"}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def max_relative_error(eigvals: list[float], reference: list[float]) -> float:
    """Max |a - b| / b_max over the leading pairs, b the reference eigenvalues."""
    num = min(len(eigvals), len(reference))
    scale = max(abs(reference[0]), 1e-30)
    return max(abs(a - b) for a, b in zip(eigvals[:num], reference[:num])) / scale


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    if names:
        cpu = names[0]
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def report(results: dict, grid: list, command: str) -> str:
    """Render the results as a Markdown page."""
    lines = [
        "# Benchmark: Gram engine",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}, {os.environ.get('BENCH_THREADS', '2')} torch threads  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        "Times are in gradient evaluations (one forward and backward pass of the mean loss with plain",
        "autograd, median of at least 3 and up to 21 within 2 s, after one untimed, same process). Runs under 3 s are the median of 3. Memory is the peak resident set size of a fresh process",
        "per case, minus its size just before the method ran (after model, data and gradient). The",
        f"error is max |λ − λ_ref| / λ_ref,max over the leading pairs; λ_ref is the exact GGN (float64)",
        "where it fits, else the materialized method's spectrum (marked *). All Gram matrices in float32;",
        f"top-k methods compute k = {TOP_K}.",
        "",
        "| problem | N | D | method | seconds | gradients | peak MB | vs materialized (time, memory) | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for problem, num_samples, methods in grid:
        cases = results[f"{problem}/{num_samples}"]
        reference = cases.get("exact", {}).get("eigvals")
        marker = ""
        if reference is None:
            reference, marker = cases.get("materialized", {}).get("eigvals"), "*"
        base = cases.get("materialized", {})
        for method in methods:
            case = cases[method]
            if "skipped" in case:
                if method != "exact":
                    lines.append(f"| {problem} | {num_samples} | | {method} | {case['skipped']} | | | | |")
                continue
            ratio = ""
            if "seconds" in base and method != "materialized":
                ratio = f"{case['seconds'] / base['seconds']:.2f}, {case['peak_increase_mb'] / max(base['peak_increase_mb'], 1):.2f}"
            error = "" if reference is None or (method == "materialized" and marker) else f"{max_relative_error(case['eigvals'], reference):.1e}{marker}"
            lines.append(
                f"| {problem} | {num_samples} | {case['num_params']} | {method} | {case['seconds']:.2f} | "
                f"{case['gradients']:.1f} | {case['peak_increase_mb']:.0f} | {ratio} | {error} |"
            )
    lines += [
        "",
        "Methods: `engine` is `compute_curvature` (full spectrum, `gram_path=auto`); `engine_topk` the same",
        f"with `top_k={TOP_K}`; `materialized` is BackPACK's `SqrtGGNExact` with each parameter's whole",
        "slice of V contracted to V Vᵀ (`gram_path=materialized`, the approach before the structured",
        f"paths); `curvlinops_topk` is curvlinops' `GGNLinearOperator` with scipy `eigsh(k={TOP_K})`;",
        "`exact` builds the D×D GGN with torch.func and calls `eigvalsh`.",
        "",
        "Left out to keep one run near ten minutes on two shared cores: N=128 and N=256 for All-CNN-C",
        "(C=100, Gram matrices of 12800² and more), curvlinops except at N=32 of the MLP",
        f"and 3c3d (over 100 gradient evaluations each), the exact GGN above D={EXACT_MAX_PARAMS} and at N=256,",
        f"and the materialized method where the largest parameter's slice of V exceeds {MATERIALIZED_MAX_GB} GB.",
        "",
        "## Targets",
        "",
        *target_lines(results, grid),
    ]
    return "\n".join(lines) + "\n"


def target_lines(results: dict, grid: list) -> list[str]:
    """Check the engine's targets against the measured cases, one line each."""
    lines = []
    case = results.get("cifar10_3c3d/128", {})
    engine, base = case.get("engine", {}), case.get("materialized", {})
    if "gradients" in engine and "peak_increase_mb" in base:
        fast = engine["gradients"] <= 25
        lean = engine["peak_increase_mb"] <= base["peak_increase_mb"] / 4
        lines.append(
            f"- cifar10_3c3d, N=128, full spectrum in at most 25 gradient evaluations: "
            f"{'met' if fast else 'NOT met'} ({engine['gradients']:.1f})."
        )
        lines.append(
            f"- same case, peak memory at most a quarter of the materialized approach: {'met' if lean else 'NOT met'} "
            f"({engine['peak_increase_mb']:.0f} MB vs {base['peak_increase_mb']:.0f} MB)."
        )
    slower = []
    for problem, num_samples, _ in grid:
        cases = results[f"{problem}/{num_samples}"]
        if "seconds" in cases.get("engine", {}) and "seconds" in cases.get("materialized", {}):
            if cases["engine"]["seconds"] > cases["materialized"]["seconds"]:
                slower.append(f"{problem} N={num_samples}")
    lines.append(
        "- never slower than the materialized approach: "
        + ("met on every measured case." if not slower else f"NOT met on {', '.join(slower)}.")
    )
    for problem, num_samples, _ in grid:
        cases = results[f"{problem}/{num_samples}"]
        topk, curvlinops = cases.get("engine_topk", {}), cases.get("curvlinops_topk", {})
        if "seconds" in topk and "seconds" in curvlinops:
            faster = topk["seconds"] < curvlinops["seconds"]
            lines.append(
                f"- top-{TOP_K} faster than curvlinops + eigsh on {problem} N={num_samples}: "
                f"{'met' if faster else 'NOT met'} ({topk['seconds']:.2f} s vs {curvlinops['seconds']:.2f} s)."
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, metavar=("PROBLEM", "N", "METHOD"), help="run one case (internal)")
    parser.add_argument("--quick", action="store_true", help="run the small grid only")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per case before it is skipped")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="Markdown page to write")
    parser.add_argument("--from-json", type=Path, help="rewrite the page from the .json of an earlier run")
    args = parser.parse_args()

    if args.case:
        problem, num_samples, method = args.case
        print(json.dumps(run_case(problem, int(num_samples), method)))
        return

    grid = QUICK_GRID if args.quick else GRID
    command = "python benchmarks/gram_engine.py" + (" --quick" if args.quick else "")
    if args.timeout != parser.get_default("timeout"):
        command += f" --timeout {args.timeout:g}"
    if args.from_json:
        args.output.write_text(report(json.loads(args.from_json.read_text()), grid, command))
        return

    results = {}
    for problem, num_samples, methods in grid:
        cases = {}
        for method in methods:
            cases[method] = spawn_case(problem, num_samples, method, args.timeout)
            summary = {k: v for k, v in cases[method].items() if k != "eigvals"}
            print(problem, num_samples, method, summary, flush=True)
        results[f"{problem}/{num_samples}"] = cases
    args.output.write_text(report(results, grid, command))
    (args.output.with_suffix(".json")).write_text(json.dumps(results))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
