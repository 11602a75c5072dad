"""Beyond masks on SmolLM2-135M: 2:4 sparsity with a low-rank correction, and SVD-LLM against structural pruning.

One process, every row measured the same way (run it under the CPU lock):

    flock /tmp/prunekit-cpu.lock python benchmarks/lowrank_smollm2.py

Rows:

- 2:4 with SparseGPT and with Wanda, alone and with the low-rank correction at 5 % and 10 % extra parameters
  (``prunekit prune --method M --pattern 2:4 --lowrank-budget B``, its defaults: every layer the same share of
  extra parameters, the sparse part and the correction refined in 4 alternating rounds).
- 20 % of the parameters removed: SVD-LLM (``prunekit shrink --method svd-llm --ratio 0.2``), SliceGPT
  (``prunekit shrink --method slicegpt --ratio 0.2``, the tied head untied, and ``--method-arg head=tied``) and
  ``prunekit shrink``'s default for causal LMs, Fisher with MLP neurons and key/value groups ranked globally
  (``prunekit shrink --ratio 0.2``).
- 2:4 with ARMOR's factorisation instead of the correction, at 10 % extra parameters (``prunekit prune --method M
  --pattern 2:4 --lowrank-budget 0.1 --lowrank-kind armor``; its defaults unless ``ARMOR`` says otherwise).

``--rows KEY,...`` measures only the named rows (keys in ``ROWS``) and merges them into the existing results,
replacing rows of the same name and keeping the others and their dense row as they were measured.

Measured for each: perplexity on the pinned wiki protocol (calibration: 32 random windows of 512 tokens of the
train split, seed 0; test: the first 40 non-overlapping 512-token windows of the test split), parameters, CPU
tokens/s at batch 1 and 8 (128-token forward passes, median of 5 after 2 warm-ups, 2 threads), each model timed
side by side with the dense model in the same process (passes alternating; only the ratio is comparable across
rows), the bytes of its weights on disk (float32 safetensors as written; for the 2:4 rows also prunekit's
compressed copy), and the wall time of the pruning call. Results: benchmarks/results/lowrank_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402

from prunekit.core.lowrank import lowrank_layers, lowrank_parameters  # noqa: E402
from prunekit.core.text import TextProtocol, calibration_windows, test_windows  # noqa: E402
from prunekit.evaluate.measure import count_parameters  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.io.checkpoint import write_compressed, write_dense  # noqa: E402
from prunekit.models.base import adapter_for  # noqa: E402
from prunekit.models.loading import load_model  # noqa: E402
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure  # noqa: E402
from prunekit.structure.measure import SpeedProtocol, lm_inputs, measure_side_by_side  # noqa: E402
from prunekit.structure.recipe import ShrinkRecipe  # noqa: E402
from prunekit.structure.saving import save_structured  # noqa: E402
from prunekit.structure.shrink_method import get_shrink_method  # noqa: E402
from prunekit.weights.pipeline import prune_weights  # noqa: E402
from prunekit.weights.lowrank import LowRankSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL = TextProtocol()
SPEED = SpeedProtocol(batch_sizes=(1, 8), runs=5, warmup=2, threads=2, seq_len=128)
BUDGETS = (0.0, 0.05, 0.1)
METHODS = ("sparsegpt", "wanda")
RATIO = 0.2
FINISHED: list[dict] = []
PARTIAL: Path | None = None
ARMOR: dict = {}  # ARMOR's settings beyond budget and kind: its defaults (each row's are in its lowrank.settings)
TARGET = 2.0  # SparseGPT 2:4 + at most 10 % extra parameters: at most twice the dense perplexity


def _speed(model, dense) -> dict:
    make = lm_inputs(SPEED.seq_len, dense.get_input_embeddings().num_embeddings)
    speeds = measure_side_by_side({"dense": dense, "model": model}, make, SPEED.seq_len, SPEED, unit="tokens")
    return {f"b{batch}": {"tokens_per_s": speeds["model"].throughput[batch],
                          "dense_tokens_per_s": speeds["dense"].throughput[batch],
                          "ratio": speeds["model"].throughput[batch] / speeds["dense"].throughput[batch]}
            for batch in SPEED.batch_sizes}


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def _sizes_weights(model) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, compressed_dir = Path(tmp, "dense"), Path(tmp, "compressed")
        dense_dir.mkdir()
        compressed_dir.mkdir()
        write_dense(model, dense_dir)
        write_compressed(model, compressed_dir)
        return {"dense_bytes": _bytes(dense_dir), "compressed_bytes": _bytes(compressed_dir)}


def _sizes_structure(model) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_structured(model, Path(tmp))
        return {"dense_bytes": _bytes(Path(tmp)), "from_pretrained": saved.from_pretrained}


def _row(name: str, model, dense, test, seconds: float, sizes: dict, extra: dict) -> dict:
    row = {"name": name, "parameters": count_parameters(model), "perplexity": perplexity(model, test).perplexity,
           "prune_seconds": seconds, "size": sizes, "speed": _speed(model, dense), **extra}
    print(f"{name}: perplexity {row['perplexity']:.2f}, {row['parameters']:,} parameters, "
          f"b1 {row['speed']['b1']['ratio']:.2f}× b8 {row['speed']['b8']['ratio']:.2f}× dense", flush=True)
    FINISHED.append(row)
    if PARTIAL is not None:  # what a long run has measured so far survives an interruption
        write_json(PARTIAL, {**json.loads(PARTIAL.read_text()), "rows": FINISHED} if PARTIAL.exists() else {"rows": FINISHED})
    return row


def sparse_row(dense, calibration, test, method: str, budget: float, kind: str = "correction",
               refit: bool = False, stream: str = "auto", asymmetric: bool = False) -> dict:
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    lowrank = {"budget": budget, "kind": kind, **(ARMOR if kind == "armor" else {}), **({"refit": True} if refit else {}),
               "stream": stream}
    result = prune_weights(model, method, pattern="2:4", calibration=calibration, lowrank=lowrank,
                           asymmetric=asymmetric)
    seconds = time.perf_counter() - started
    summary = None
    if result.lowrank is not None:
        summary = {k: v for k, v in result.lowrank.items() if k != "layers"}
        size = "block" if kind == "armor" else "rank"
        summary[f"{size}s"] = {layer["name"]: layer[size] for layer in result.lowrank["layers"]}
        assert summary["extra_parameters"] == lowrank_parameters(model)
    label = "armor" if kind == "armor" else "low-rank"
    stream = LowRankSettings(**lowrank).corrected_stream if budget else None
    name = (f"{method} 2:4" + (f" + {label} {budget:.0%}" if budget else "") + (" (kept values refit)" if refit else "")
            + (" (sparse stream)" if stream is False else "") + (" (asymmetric)" if asymmetric else ""))
    return _row(name, model, dense, test, seconds, _sizes_weights(model),
                {"group": "2:4", "method": method, "budget": budget, "kind": kind, "refit": refit,
                 "stream": None if stream is None else "corrected" if stream else "sparse", "lowrank": summary,
                 "asymmetric": asymmetric,
                 "measured": time.strftime("%Y-%m-%d")})


def svd_llm_row(dense, calibration, test, update: bool = False) -> dict:
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    result = get_shrink_method({"name": "svd-llm", "update": update}).apply(model, calibration, RATIO, 4)
    seconds = time.perf_counter() - started
    name = f"SVD-LLM{' + second-factor update' if update else ''}, {RATIO:.0%} removed"
    return _row(name, model, dense, test, seconds, _sizes_structure(model),
                {"group": f"{RATIO:.0%}", "method": "svd-llm", "details": {k: v for k, v in result.items() if k != "layers"}})


def slicegpt_row(dense, calibration, test, head: str) -> dict:
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    result = get_shrink_method({"name": "slicegpt", "head": head}).apply(model, calibration, RATIO, 4)
    seconds = time.perf_counter() - started
    return _row(f"SliceGPT (head {head}), {RATIO:.0%} removed", model, dense, test, seconds,
                _sizes_structure(model), {"group": f"{RATIO:.0%}", "method": f"slicegpt-{head}",
                                          "details": {k: v for k, v in result.items() if k != "kept_energy"}})


def fisher_row(dense, calibration, test) -> dict:
    model = copy.deepcopy(dense)
    recipe = ShrinkRecipe.build({"ratio": RATIO}).with_default_importance("causal-lm")
    started = time.perf_counter()
    prune_structure(model, example_inputs=lm_example_inputs(), settings=recipe.width_settings(),
                    calibration=lm_calibration(calibration, 4), adapter=adapter_for(model))
    seconds = time.perf_counter() - started
    return _row(f"shrink default (Fisher, global), {RATIO:.0%} removed", model, dense, test, seconds,
                _sizes_structure(model), {"group": f"{RATIO:.0%}", "method": "fisher-global"})


FIDELITY_WINDOWS = 4  # test windows the fidelity checks compare logits on


def _max_logit_difference(model, reference, test) -> dict:
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        for window in test[:FIDELITY_WINDOWS]:
            expected = reference(window[None]).logits
            worst = max(worst, float((model(window[None]).logits - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
    return {"max_abs": worst, "max_abs_logit": scale, "relative": worst / max(scale, 1e-30)}


def fidelity_row(dense, calibration, test) -> dict:
    """The two exactness claims on the real model: SliceGPT's folding and rotation without slicing, and
    SVD-LLM at full rank, each leave the output unchanged up to float32 rounding."""
    from prunekit.structure.methods.slicegpt import find_residual_layout, fold_norms, rotate_and_slice, untie_head

    rotated = copy.deepcopy(dense)
    layout = find_residual_layout(rotated, adapter_for(rotated), calibration[:1, :8])
    untie_head(rotated, layout)
    fold_norms(rotated, layout)
    folded = _max_logit_difference(rotated, dense, test)
    started = time.perf_counter()
    rotate_and_slice(rotated, layout, calibration, 4, layout.width)
    rotation_seconds = time.perf_counter() - started
    sliced = _max_logit_difference(rotated, dense, test)
    del rotated
    factored = copy.deepcopy(dense)
    get_shrink_method("svd-llm").factor(factored, calibration, 4, lambda out_features, in_features:
                                        min(out_features, in_features))
    worst_weight = 0.0
    for name, module in lowrank_layers(factored).items():
        weight = dense.get_submodule(name).weight
        product = module.lowrank_out.weight @ module.lowrank_in.weight
        worst_weight = max(worst_weight, float(((product - weight).abs().max() / weight.abs().max())))
    full_rank = _max_logit_difference(factored, dense, test)
    row = {"name": "fidelity", "group": "fidelity", "slicegpt_folded": folded, "slicegpt_rotated": sliced,
           "slicegpt_rotation_seconds": rotation_seconds, "svd_llm_full_rank": full_rank,
           "svd_llm_full_rank_max_relative_weight_error": worst_weight, "windows": min(FIDELITY_WINDOWS, len(test)),
           "measured": time.strftime("%Y-%m-%d")}
    print(f"fidelity: SliceGPT unsliced max |Δlogit| {sliced['max_abs']:.2e}, SVD-LLM full rank "
          f"{full_rank['max_abs']:.2e}", flush=True)
    FINISHED.append(row)
    return row


ROWS = {  # key -> the row it measures, in the order a full run measures them (the target and 20 % first)
    "sparsegpt": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.0),
    "sparsegpt-lowrank10": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.1),
    "sparsegpt-armor10": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.1, "armor"),
    "sparsegpt-lowrank10-refit": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.1, refit=True),
    "sparsegpt-lowrank10-refit-sparse-stream": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.1, refit=True,
                                                                          stream="sparse"),
    "sparsegpt-asymmetric": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.0, asymmetric=True),
    "sparsegpt-lowrank10-refit-asymmetric": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.1, refit=True,
                                                                       asymmetric=True),
    "wanda-asymmetric": lambda d, c, t: sparse_row(d, c, t, "wanda", 0.0, asymmetric=True),
    "svd-llm": svd_llm_row,
    "svd-llm-update": lambda d, c, t: svd_llm_row(d, c, t, update=True),
    "fisher": fisher_row,
    "slicegpt-untie": lambda d, c, t: slicegpt_row(d, c, t, "untie"),
    "slicegpt-tied": lambda d, c, t: slicegpt_row(d, c, t, "tied"),
    "wanda": lambda d, c, t: sparse_row(d, c, t, "wanda", 0.0),
    "wanda-lowrank10": lambda d, c, t: sparse_row(d, c, t, "wanda", 0.1),
    "wanda-armor10": lambda d, c, t: sparse_row(d, c, t, "wanda", 0.1, "armor"),
    "sparsegpt-lowrank5": lambda d, c, t: sparse_row(d, c, t, "sparsegpt", 0.05),
    "fidelity": fidelity_row,
    "wanda-lowrank5": lambda d, c, t: sparse_row(d, c, t, "wanda", 0.05),
}


def _order(row: dict):
    kinds = ("correction", "armor")
    position = {(m, b, k): i for i, (m, b, k) in enumerate(
        (m, b, k) for m in METHODS for k in kinds for b in BUDGETS if b or k == "correction")}
    key = (row.get("method"), row.get("budget"), row.get("kind", "correction"))
    return (row["group"] != "2:4", position.get(key, 0))


def run_all(dense, calibration, test, keys=None) -> list[dict]:
    """The rows named by ``keys`` (all by default), in ``ROWS``' order."""
    return sorted([ROWS[key](dense, calibration, test) for key in ROWS if keys is None or key in keys], key=_order)


def _fidelity_lines(rows: list[dict]) -> list[str]:
    found = next((r for r in rows if r["group"] == "fidelity"), None)
    if found is None:
        return []

    def cell(measured: dict) -> str:
        return f"{measured['max_abs']:.2e} ({measured['relative']:.1e} of the largest logit)"

    return ["## Fidelity: no compression, no change", "",
            markdown_table(["check", f"max abs logit difference to dense ({found['windows']} test windows)"],
                           [("SliceGPT: norms folded into the linears", cell(found["slicegpt_folded"])),
                            ("SliceGPT: folded and rotated, not sliced", cell(found["slicegpt_rotated"])),
                            ("SVD-LLM at full rank", cell(found["svd_llm_full_rank"]))]), "",
            f"SVD-LLM at full rank: the largest relative error of a layer's L·R against its weight is "
            f"{found['svd_llm_full_rank_max_relative_weight_error']:.1e}.", ""]


def report(rows: list[dict], dense_row: dict) -> str:
    def table(group):
        return markdown_table(
            ["row", "extra / removed parameters", "perplexity", "× dense", "tokens/s b1 (× dense)",
             "tokens/s b8 (× dense)", "weights on disk", "compressed copy", "prune s"],
            [(r["name"], f"{(r['parameters'] - dense_row['parameters']) / dense_row['parameters']:+.1%}",
              f"{r['perplexity']:.2f}", f"{r['perplexity'] / dense_row['perplexity']:.2f}",
              f"{r['speed']['b1']['tokens_per_s']:.0f} ({r['speed']['b1']['ratio']:.2f}×)",
              f"{r['speed']['b8']['tokens_per_s']:.0f} ({r['speed']['b8']['ratio']:.2f}×)",
              f"{r['size']['dense_bytes'] / 2**20:.1f} MiB",
              f"{r['size']['compressed_bytes'] / 2**20:.1f} MiB" if "compressed_bytes" in r["size"] else "–",
              f"{r['prune_seconds']:.0f}") for r in rows if r["group"] == group])

    best = min((r for r in rows if r.get("method") == "sparsegpt" and 0 < r.get("budget", 0) <= 0.1),
               key=lambda r: r["perplexity"], default=None)
    verdict = ("not measured" if best is None else
               f"{'PASS' if best['perplexity'] <= TARGET * dense_row['perplexity'] else 'MISS'} "
               f"({best['name']}: {best['perplexity']:.2f})")
    return "\n".join([
        "# Beyond masks on SmolLM2-135M", "",
        f"Dense: perplexity {dense_row['perplexity']:.2f}, {dense_row['parameters']:,} parameters, "
        f"{dense_row['size']['dense_bytes'] / 2**20:.1f} MiB of float32 weights.", "",
        "## 2:4 sparsity, alone, with the low-rank correction, and with ARMOR's factorisation", "",
        "Parameters: the sparse model counts its zeros (as stored densely); + is the correction's (or ARMOR's "
        "block-diagonal factors') extra parameters as a share of the whole model.", "",
        table("2:4"), "",
        f"Target (SparseGPT 2:4 + ≤ 10 % extra parameters ≤ {TARGET:g}× dense = "
        f"{TARGET * dense_row['perplexity']:.1f}): {verdict}.", "",
        *[f"{r['name']}: {r['lowrank']['settings']['iterations']} alternating rounds, "
          + (f"the mask re-selected every {r['lowrank']['settings']['reselect']} rounds."
             if r['lowrank']['settings']['reselect'] else "the method's mask kept.")
          for r in rows if r.get("kind") == "armor"],
        "",
        *_fidelity_lines(rows),
        *[line for group in sorted({r["group"] for r in rows} - {"2:4", "fidelity"})
          for line in (f"## {group} of the parameters removed", "", table(group), "")],
        f"Protocol: {PROTOCOL.summary()}. Speed: {SPEED.describe()}; each model timed side by side with the dense "
        "model, passes alternating, in this one process; the dense figures differ from row to row by the machine's "
        "noise, the ratios are what compares.", ""])


def main(argv=None) -> int:
    global PROTOCOL, RATIO, PARTIAL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "lowrank_smollm2")
    parser.add_argument("--model", default=None, help="another model (a quick check of the script); default SmolLM2")
    parser.add_argument("--ratio", type=float, default=RATIO)
    parser.add_argument("--small", action="store_true", help="4 calibration and 2 test windows of 64 tokens")
    parser.add_argument("--report-partial", action="store_true", help="write the report from the rows a stopped run "
                                                                      "left in OUT.partial.json")
    parser.add_argument("--rows", default=None, help="comma-separated row keys to measure and merge into OUT.json: "
                                                         + ", ".join(ROWS))
    args = parser.parse_args(argv)
    keys = None if args.rows is None else [key.strip() for key in args.rows.split(",") if key.strip()]
    if keys is not None and (not keys or set(keys) - set(ROWS)):
        parser.error(f"--rows takes keys among {', '.join(ROWS)}")
    RATIO = args.ratio
    PARTIAL = args.out.with_suffix(".partial.json")
    if args.small:
        PROTOCOL = TextProtocol(calibration_samples=4, test_windows=2, seq_len=64)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.report_partial:
        partial = json.loads(PARTIAL.read_text())
        markdown = report(partial["rows"], partial["dense"]) + (
            f"\nPartial: the run was stopped after {len(partial['rows'])} of {len(ROWS)} rows.\n")
        write_json(args.out.with_suffix(".json"), {**partial, "protocol": PROTOCOL.describe(),
                                                   "speed_protocol": SPEED.describe(), "environment": environment(),
                                                   "partial": True})
        args.out.with_suffix(".md").write_text(markdown)
        print(markdown)
        return 0
    lm = load_model(args.model, kind="causal-lm")
    dense = lm.model.eval()
    calibration, test = calibration_windows(lm.tokenizer, PROTOCOL), test_windows(lm.tokenizer, PROTOCOL)
    results = args.out.with_suffix(".json")
    previous = json.loads(results.read_text()) if keys and results.exists() else None
    if previous is not None and previous.get("protocol") != PROTOCOL.describe():
        raise SystemExit(f"{args.out.with_suffix('.json')} was measured under another protocol; rerun every row")
    if previous is not None:
        dense_row = previous["dense"]  # the dense model is the same: its figures are kept as measured
    else:
        dense_row = {"name": "dense", "parameters": count_parameters(dense),
                     "perplexity": perplexity(dense, test).perplexity, "size": _sizes_weights(dense)}
    print(f"dense: perplexity {dense_row['perplexity']:.2f}", flush=True)
    write_json(PARTIAL, {"dense": dense_row, "rows": FINISHED})
    rows = run_all(dense, calibration, test, keys)
    notes = ""
    if previous is not None:
        measured = {row["name"] for row in rows}
        rows = sorted([row for row in previous["rows"] if row["name"] not in measured] + rows, key=_order)
        notes = (f"\nRows measured by a later `--rows` run of this script, merged into the earlier results: "
                 f"{', '.join(sorted(measured))}.\n")
        if previous.get("partial"):
            notes += "\nPartial: the last full run was stopped before its end; rows not listed were not measured.\n"
    markdown = report(rows, dense_row) + notes
    write_json(args.out.with_suffix(".json"), {"dense": dense_row, "rows": rows, "protocol": PROTOCOL.describe(),
                                               "speed_protocol": SPEED.describe(), "environment": environment(),
                                               **({"partial": previous["partial"]} if previous and "partial" in previous
                                                  else {})})
    args.out.with_suffix(".md").write_text(markdown)
    PARTIAL.unlink(missing_ok=True)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
