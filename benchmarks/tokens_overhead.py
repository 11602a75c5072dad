"""Per-block overhead of the token patch at batch 1 (issue 17, item 5): the token code before and after its
rewrite, each timed against the unpatched model in the same process, in one run.

    git worktree add /tmp/tokens-before <commit before the rewrite>
    flock /tmp/prunekit-cpu.lock python benchmarks/tokens_overhead.py --before /tmp/tokens-before/src
    git worktree remove --force /tmp/tokens-before

Models: all-MiniLM-L6-v2 on 256-token inputs (254 consecutive word pieces of the wiki test text between [CLS] and
[SEP]) and prunekit's Fashion-MNIST ViT (50 tokens; the trained one when it is in the cache, else the same
architecture with seeded random weights, whose speed is the same and whose accuracy means nothing).

1. Quality (current code, in this process): for MiniLM, the cosine of the mean-pooled embedding to the unpatched
   model's, over the first QUALITY_WINDOWS windows, for each candidate method and ratio; each method's "best ratio"
   is its largest ratio with a mean cosine of at least 0.98. Which tokens a method keeps is the same before and
   after the rewrite (tests/tokens/test_token_reference_selections.py), so quality is measured once.
2. Speed: worker processes, one per code version and round, in the order before, after, after, before (ABBA over
   processes). Inside a worker every variant (unpatched, patched at ratio 0, each best ratio) is timed at batch 1
   by ``time_alternating`` (one pass of each per round, the order reversed every other round), the patch installed
   just before its pass and removed after; a variant's speed-up is the worker's median unpatched time over its
   median time. A worker also counts the tensor operations of one pass of each variant (exact, free of noise).

Writes benchmarks/results/tokens_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "tokens_overhead"
TOKENS = 256
QUALITY_WINDOWS = 32
THRESHOLD = 0.98
# method label: (method, layers or None for the method's own schedule, ratios tried)
MINILM_CANDIDATES: dict[str, tuple[str, list[int] | None, list[float]]] = {
    "fastv@1": ("fastv", [1], [0.15, 0.2, 0.25]),
    "fastv@2": ("fastv", [2], [0.25, 0.3, 0.35]),
    "fastv@1-4": ("fastv", [1, 2, 3, 4], [0.08, 0.1, 0.12]),
    "fastv@1-5": ("fastv", [1, 2, 3, 4, 5], [0.08, 0.1, 0.11, 0.12]),
    "evit": ("evit", None, [0.1, 0.12, 0.13, 0.14]),
    "tome": ("tome", None, [0.05, 0.06, 0.065]),
    "tome@1-5": ("tome", [1, 2, 3, 4, 5], [0.07, 0.08, 0.09]),
}
# ratio 0 through the patched code: ToMe reduces in every block (the most patched blocks), EViT in three
RATIO_ZERO = [("tome", None), ("evit", None)]
# the ViT's points: the ratios of docs/tokens.md's batch-1 column (ToMe 0.25 is the best point within 0.5 accuracy
# point of the trained model)
VIT_POINTS = [("tome", None, 0.25), ("evit", None, 0.2), ("fastv", None, 0.4), ("random", None, 0.2),
              ("attention-magnitude", None, 0.2), ("zero-tprune", None, 0.3), ("divprune", None, 0.3)]


def _label(method: str, layers: list[int] | None, ratio: float) -> str:
    where = f"@{','.join(map(str, layers))}" if layers else ""
    return f"{method}{where} {ratio:g}"


# ----- inputs ----------------------------------------------------------------------------------------------------
def minilm_windows(tokenizer, count: int):
    import torch

    from prunekit.core.text import consecutive_windows, tokenize, wiki_split

    _calibration, test = wiki_split(0.8)
    body = consecutive_windows(tokenize(tokenizer, test), count, TOKENS - 2)
    ids = torch.cat([torch.full((count, 1), tokenizer.cls_token_id), body, torch.full((count, 1), tokenizer.sep_token_id)],
                    dim=1)
    return ids


def load_vit():
    """The trained Fashion-MNIST ViT when cached, else its architecture with seeded random weights."""
    import torch

    from prunekit.errors import PrunekitError
    from prunekit.models.loading import load
    from prunekit.models.vit import ViT
    from prunekit.tokens.vision import FASHION_VIT_SETTINGS

    try:
        return load("fashion-vit").eval(), "trained (Fashion-MNIST)"
    except PrunekitError:
        torch.manual_seed(0)
        return ViT(**FASHION_VIT_SETTINGS).eval(), "untrained (seeded random weights; the trained one is not cached)"


# ----- quality (this process, current code) ----------------------------------------------------------------------
def minilm_quality(model, tokenizer, windows: int = QUALITY_WINDOWS) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import prunekit.tokens as tokens

    ids = minilm_windows(tokenizer, windows)
    mask = torch.ones_like(ids)

    def embed(patch) -> torch.Tensor:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(ids), 16):  # unpadded rows: each keeps what it keeps alone (tested)
                hidden = model(input_ids=ids[start:start + 16], attention_mask=mask[start:start + 16]).last_hidden_state
                rows.append(F.normalize((patch.pool(hidden) if patch else hidden.mean(dim=1)).float(), dim=-1))
        return torch.cat(rows)

    reference = embed(None)
    sweep: dict[str, list[dict[str, Any]]] = {}
    best: dict[str, dict[str, Any]] = {}
    for label, (method, layers, ratios) in MINILM_CANDIDATES.items():
        for ratio in ratios:
            with tokens.apply(model, method, ratio, layers=layers, tokenizer=tokenizer) as patch:
                cosine = (embed(patch) * reference).sum(dim=-1)
                kept = patch.trace.tokens_out
            point = {"method": method, "layers": layers, "ratio": ratio, "cosine": float(cosine.mean()),
                     "cosine_min": float(cosine.min()), "tokens_out": kept}
            sweep.setdefault(label, []).append(point)
            if point["cosine"] >= THRESHOLD:
                best[label] = point
            print(f"quality {label} {ratio:g}: cosine {point['cosine']:.4f}, {kept:.1f} tokens left", flush=True)
    return {"windows": windows, "threshold": THRESHOLD, "sweep": sweep, "best": best}


# ----- speed (worker processes) ----------------------------------------------------------------------------------
def _count_operations(run) -> int:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with torch.inference_mode(), counter:
        run()
    return counter.count


def _time_variants(model, run, variants: list[dict[str, Any]], repeats: int, warmup: int,
                   tokenizer=None) -> dict[str, Any]:
    import prunekit.tokens as tokens
    from prunekit.evaluate.measure import time_alternating

    patches = {}
    for variant in variants:
        extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
        patch = tokens.apply(model, variant["method"], variant["ratio"], layers=variant["layers"], **extra)
        patch.remove()
        patches[variant["label"]] = patch

    def only(label: str | None):
        def switch() -> None:
            for name, patch in patches.items():
                if name != label:
                    patch.remove()
            if label is not None:
                patches[label].install()
        return switch

    calls = {"unpatched": run, **{label: run for label in patches}}
    before = {"unpatched": only(None), **{label: only(label) for label in patches}}
    operations = {}
    for label in calls:
        before[label]()
        run()  # the first pass of a patch verifies its block split; not counted
        operations[label] = _count_operations(run)
    times = time_alternating(calls, repeats, warmup, before=before)
    only(None)()
    return {"seconds": times, "operations": operations}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import prunekit
    from prunekit.evaluate.measure import machine_load
    from prunekit.models.loading import load_model

    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"prunekit": str(Path(prunekit.__file__).parent), "load_before": machine_load()}
    loaded = load_model("minilm")
    model, tokenizer = loaded.model.eval(), loaded.require_tokenizer()
    ids = minilm_windows(tokenizer, 1)
    mask = torch.ones_like(ids)
    out["minilm"] = _time_variants(model, lambda: model(input_ids=ids, attention_mask=mask), spec["minilm"],
                                   spec["repeats"]["minilm"], spec["warmup"], tokenizer)
    vit, _ = load_vit()
    image = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out["vit"] = _time_variants(vit, lambda: vit(image), spec["vit"], spec["repeats"]["vit"], spec["warmup"])
    out["load_after"] = machine_load()
    return out


def run_worker(source: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One worker process importing prunekit from ``source`` (a ``src`` folder)."""
    environment = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "worker", json.dumps(spec)], env=environment, check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["prunekit"]).resolve() != (source / "prunekit").resolve():
        raise RuntimeError(f"the worker imported prunekit from {result['prunekit']}, not from {source}")
    return result


# ----- the run -----------------------------------------------------------------------------------------------------
def summarise(workers: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Per variant: each worker's paired speed-up and median time, and their mean over the worker processes."""
    labels = list(workers[0][model]["seconds"])
    table = {}
    for label in labels:
        speedups, medians = [], []
        for result in workers:
            seconds = result[model]["seconds"]
            base, own = statistics.median(seconds["unpatched"]), statistics.median(seconds[label])
            speedups.append(base / own)
            medians.append(own * 1e3)
        table[label] = {"speedup": statistics.mean(speedups), "speedups": speedups,
                        "median_ms": statistics.mean(medians), "medians_ms": medians,
                        "operations": workers[0][model]["operations"][label]}
    return table


def markdown(data: dict[str, Any]) -> str:
    from prunekit.evaluate.report import markdown_table

    versions = list(data["speed"])
    lines = ["# Token patch overhead at batch 1 (issue 17, item 5)", "",
             f"Run {data['date']}; torch {data['environment']['torch']}, {data['threads']} threads, "
             f"{data['environment']['processor']}; under /tmp/prunekit-cpu.lock. Code versions: "
             + "; ".join(f"{name}: `{source}`" for name, source in data["sources"].items()) + ".", "",
             "Timing: every variant timed at batch 1 in the same worker process as the unpatched model, one pass of "
             f"each per round in alternating order (ABBA), {data['repeats']['minilm']} rounds for MiniLM and "
             f"{data['repeats']['vit']} for the ViT after {data['warmup']} untimed ones; speed-up = the worker's median "
             "unpatched time / the variant's median time; the table gives the mean over "
             f"{data['rounds']} worker process(es) per version (run in the order {', '.join(data['order'])}), and "
             "each process's figure in brackets. Operations = tensor operations dispatched in one pass.", ""]
    for model, title in (("minilm", f"all-MiniLM-L6-v2, one {TOKENS}-token input"), ("vit", f"prunekit ViT ({data['vit']})")):
        headers = ["variant"]
        for version in versions:
            headers += [f"ms ({version})", f"speed-up ({version})", f"operations ({version})"]
        rows = []
        for label in data["speed"][versions[0]][model]:
            row: list[Any] = [label]
            for version in versions:
                entry = data["speed"][version][model][label]
                row += [round(entry["median_ms"], 2),
                        f"{entry['speedup']:.3f} ({', '.join(f'{s:.3f}' for s in entry['speedups'])})",
                        entry["operations"]]
            rows.append(row)
        lines += [f"## {title}", "", markdown_table(headers, rows), ""]
    quality = data["quality"]
    lines += [f"## MiniLM quality ({quality['windows']} windows of {TOKENS} tokens; cosine of the mean-pooled "
              "embedding to the unpatched model's)", ""]
    rows = []
    for label, points in quality["sweep"].items():
        for point in points:
            rows.append([label, point["ratio"], round(point["tokens_out"], 1), round(point["cosine"], 4),
                         round(point["cosine_min"], 4), "best" if quality["best"].get(label) == point else ""])
    lines += [markdown_table(["method", "ratio", "tokens left", "mean cosine", "min cosine",
                              f"largest ratio with cosine ≥ {THRESHOLD}"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        print(json.dumps(worker(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="src folder of the code before the rewrite (a git worktree)")
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per code version")
    parser.add_argument("--repeats-minilm", type=int, default=30)
    parser.add_argument("--repeats-vit", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality-windows", type=int, default=QUALITY_WINDOWS)
    args = parser.parse_args(argv)

    import torch

    from prunekit.evaluate.report import environment, write_json
    from prunekit.models.loading import load_model

    torch.set_num_threads(args.threads)
    current = Path(__file__).resolve().parents[1] / "src"
    sources = {"after": current}
    if args.before is not None:
        sources = {"before": args.before.resolve(), "after": current}
    loaded = load_model("minilm")
    quality = minilm_quality(loaded.model.eval(), loaded.require_tokenizer(), args.quality_windows)
    minilm_variants = [{"label": _label(m, layers, 0.0), "method": m, "ratio": 0.0, "layers": layers}
                       for m, layers in RATIO_ZERO]
    minilm_variants += [{"label": _label(p["method"], p["layers"], p["ratio"]), "method": p["method"],
                         "ratio": p["ratio"], "layers": p["layers"]} for p in quality["best"].values()]
    vit_variants = [{"label": _label(m, layers, 0.0), "method": m, "ratio": 0.0, "layers": layers}
                    for m, layers in RATIO_ZERO]
    vit_variants += [{"label": _label(m, layers, ratio), "method": m, "ratio": ratio, "layers": layers}
                     for m, layers, ratio in VIT_POINTS]
    spec = {"minilm": minilm_variants, "vit": vit_variants, "threads": args.threads, "warmup": args.warmup,
            "repeats": {"minilm": args.repeats_minilm, "vit": args.repeats_vit}}
    names = list(sources)
    order = []
    for round_index in range(args.rounds):  # before, after, after, before, ...
        order += names if round_index % 2 == 0 else names[::-1]
    workers: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for name in order:
        started = time.monotonic()
        workers[name].append(run_worker(sources[name], spec))
        print(f"worker {name}: {time.monotonic() - started:.0f} s", flush=True)
    _vit, vit_kind = load_vit()
    data = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
            "threads": args.threads, "warmup": args.warmup,
            "repeats": {"minilm": args.repeats_minilm, "vit": args.repeats_vit}, "rounds": args.rounds,
            "order": order, "sources": {name: str(path) for name, path in sources.items()}, "vit": vit_kind,
            "quality": quality, "spec": spec,
            "speed": {name: {"minilm": summarise(results, "minilm"), "vit": summarise(results, "vit")}
                      for name, results in workers.items()},
            "workers": workers}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{NAME}.json", data)
    text = markdown(data)
    (RESULTS / f"{NAME}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
