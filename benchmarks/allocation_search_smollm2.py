"""Allocation by measurement and search (issue 18) on SmolLM2-135M: uniform and OWL against the knapsack and the
evolutionary search, for Wanda and SparseGPT at 70 %.

One row per invocation keeps each run under ten minutes on the shared CPU (run them under the lock):

    flock /tmp/prunekit-cpu.lock python benchmarks/allocation_search_smollm2.py --rows wanda-uniform
    flock /tmp/prunekit-cpu.lock python benchmarks/allocation_search_smollm2.py --rows wanda-knapsack

A search row that runs out of time can be run again: the level database (per block), the unit costs (per unit)
and the evolution (per generation) are kept in ``--database`` and resume; ``search_seconds`` then counts only
the last invocation, and ``search_parts`` says what each part took when it was computed.

Every row: the model pruned in memory exactly as ``prunekit prune --method M --ratio 0.7 --allocation A`` does
(the search first, then the ordinary sequential one-shot pruning at the levels it found), then measured on the
pinned wiki protocol (calibration: 32 random windows of 512 tokens of the first 80 % of the articles, seed 0;
test: the first 40 non-overlapping 512-token windows of the rest; perplexity = exp of the mean window loss).
``fitness KL`` is the search's own measure applied to every row's final model alike: the mean over tokens of
KL(dense ‖ pruned) of the next-token distributions on the first 4 calibration windows (2048 tokens). ``peak RSS``
is the process's resident memory, sampled every 20 ms during the pruning call (search included).
Shrink rows (``shrink20-global``, ``shrink20-knapsack``, ``shrink20-evolutionary``, and at 40 %): the model
shrunk in memory exactly as ``prunekit shrink --ratio 0.2`` does by default (Fisher scores on the calibration
windows, MLP neurons and whole KV groups, ``global`` allocation with floor 0.1 and round_to 8), or with
``--allocation knapsack|evolutionary`` and the search settings of ``SHRINK_SEARCH`` (its unit costs and the
evolution's state kept in ``--database`` and resumed); measured before any recovery on the same protocol and
fitness KL as the weights rows.
Results: benchmarks/results/allocation_search_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from prunekit.core.allocation import ALLOCATIONS as ALLOCATIONS_REGISTRY  # noqa: E402
from prunekit.core.text import TextProtocol, calibration_windows, test_windows  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.evaluate.resources import Measured  # noqa: E402
from prunekit.models.base import adapter_for  # noqa: E402
from prunekit.models.loading import load_model  # noqa: E402
from prunekit.weights.pipeline import prune_weights, pruning_settings  # noqa: E402
from prunekit.weights.search import needs_search, search_levels, with_levels  # noqa: E402
from prunekit.weights.search.fitness import KLMeter, fitness_windows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL = TextProtocol()
RATIO = 0.7
FITNESS_TOKENS = 2048
ALLOCATIONS = {"uniform": "uniform", "owl": "owl", "knapsack": {"name": "knapsack"},
               "evolutionary": {"name": "evolutionary"}}
ROWS = [f"{method}-{allocation}" for method in ("wanda", "sparsegpt") for allocation in ALLOCATIONS]
KNOWN = {"wanda-uniform": 585.54, "wanda-owl": 567.87, "sparsegpt-uniform": 199.68, "sparsegpt-owl": 185.32,
         "shrink20-global": 42.87}  # docs/structure.md: the default `prunekit shrink --ratio 0.2`
# Width search for prunekit shrink: a level removes a tenth of a family (152 of 1536 neurons, or one of 3 KV
# groups), at most 0.8 (the KV groups stop at their floor, 2 of 3); costs on 256 tokens; 16 generations of 6
# offspring, selected on 256 then 1024 tokens. Shared by both ratios, so the unit costs are measured once.
SHRINK_SEARCH = {"step": 0.1, "max_ratio": 0.8, "sensitivity_tokens": 256, "generations": 16, "offspring": 6,
                 "stage_tokens": [256, 1024], "survivors": [2]}
SHRINK_ROWS = [f"shrink{percent}-{allocation}" for percent in (20, 40) for allocation in ("global", "knapsack",
                                                                                          "evolutionary")]


def run_row(row: str, model_path: str | None, database: Path, ratio: float, extra: dict) -> dict:
    method, allocation_name = row.split("-", 1)
    allocation = ALLOCATIONS[allocation_name]
    if isinstance(allocation, dict):
        fields = ALLOCATIONS_REGISTRY.get(allocation["name"]).model_fields
        allocation = {**allocation, "database": str(database), **{k: v for k, v in extra.items() if k in fields}}
    loaded = load_model(model_path or "smollm2", kind="causal-lm")
    model = loaded.model
    calibration = calibration_windows(loaded.tokenizer, PROTOCOL)
    test = test_windows(loaded.tokenizer, PROTOCOL)
    meter = KLMeter(model, adapter_for(model), fitness_windows(calibration, FITNESS_TOKENS), keep_block_inputs=False)
    settings = pruning_settings(method, ratio, allocation=allocation)
    search = None
    with Measured() as measured:
        started = time.perf_counter()
        if needs_search(settings):
            search = search_levels(model, settings, calibration)
            settings = pruning_settings(settings.model_copy(update={"allocation": with_levels(settings,
                                                                                                search.levels)}))
        searched = time.perf_counter()
        result = prune_weights(model, settings, calibration=calibration)
        finished = time.perf_counter()
    fitness = meter.kl()
    del meter
    ppl = perplexity(model, test, 4, "Perplexity").perplexity
    return {"row": row, "method": method, "allocation": allocation_name, "ratio": ratio,
            "achieved_ratio": result.achieved_sparsity, "perplexity": ppl, "fitness_kl": fitness,
            "search_seconds": searched - started if search else 0.0, "prune_seconds": finished - searched,
            "peak_rss_bytes": measured.peak_rss,
            "search": None if search is None else {k: v for k, v in search.to_dict().items() if k != "levels"},
            "known_perplexity": KNOWN.get(row)}


def run_shrink_row(row: str, model_path: str | None, database: Path, extra: dict) -> dict:
    """One shrink row: ``prunekit shrink --ratio R [--allocation A]``'s width pruning, before recovery."""
    from prunekit.structure.pipeline import lm_calibration, lm_example_inputs, prune_structure
    from prunekit.structure.recipe import ShrinkRecipe

    percent, allocation_name = row.removeprefix("shrink").split("-", 1)
    ratio = int(percent) / 100
    allocation: dict = {"name": allocation_name}
    if allocation_name != "global":
        fields = ALLOCATIONS_REGISTRY.get(allocation_name).model_fields
        search = {**SHRINK_SEARCH, **extra, "database": str(database / "shrink")}
        allocation["search"] = {k: v for k, v in search.items() if k in fields}
    recipe = ShrinkRecipe(ratio=ratio, allocation=allocation).with_default_importance("causal-lm")
    if recipe.data.protocol() != PROTOCOL:
        raise SystemExit("the shrink job's default protocol differs from this benchmark's")
    torch.manual_seed(recipe.data.seed)  # as the shrink job does before anything
    loaded = load_model(model_path or "smollm2", kind="causal-lm")
    model = loaded.model
    calibration = calibration_windows(loaded.tokenizer, PROTOCOL)
    test = test_windows(loaded.tokenizer, PROTOCOL)
    meter = KLMeter(model, adapter_for(model), fitness_windows(calibration, FITNESS_TOKENS), keep_block_inputs=False)
    before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with Measured() as measured:
        started = time.perf_counter()
        result = prune_structure(model, example_inputs=lm_example_inputs(), settings=recipe.width_settings(),
                                 calibration=lm_calibration(calibration, recipe.batch_size),
                                 adapter=adapter_for(model))
        finished = time.perf_counter()
    after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    fitness = meter.kl()
    del meter
    ppl = perplexity(model, test, 4, "Perplexity").perplexity
    search = result.search
    return {"row": row, "kind": "shrink", "method": f"shrink ({recipe.importance['name']})",
            "allocation": allocation_name, "ratio": ratio, "achieved_ratio": 1 - after / before,
            "parameters_after": after, "perplexity": ppl, "fitness_kl": fitness,
            "search_seconds": result.seconds.get("search_seconds", 0.0), "prune_seconds": finished - started,
            "peak_rss_bytes": measured.peak_rss,
            "search": None if search is None else {k: v for k, v in search.items() if k != "units"},
            "widths": {name: kept for name, (_, kept) in result.plan.widths.items()},
            "known_perplexity": KNOWN.get(row)}


def _shrink_markdown(rows: list[dict]) -> str:
    table = []
    for row in sorted(rows, key=lambda r: SHRINK_ROWS.index(r["row"])):
        search = row["search"]
        parts = "–"
        if search:
            seconds = search["seconds"]
            start = search["start_fitness"]
            parts = (f"unit costs {seconds['unit_costs']:.0f} s, search {seconds['search']:.0f} s (costs included); "
                     f"its KL on {search['fitness_tokens'][-1]} tokens "
                     + (f"{start:.4f} → " if start is not None else "") + f"{search['fitness']:.4f}, "
                     f"{search['evaluations']} candidates")
        table.append((f"{row['ratio']:.0%}", row["allocation"], f"{row['achieved_ratio']:.4f}",
                      f"{row['perplexity']:.2f}", f"{row['fitness_kl']:.4f}",
                      f"{row['search_seconds']:.0f} s" if search else "–", f"{row['prune_seconds']:.0f} s",
                      f"{row['peak_rss_bytes'] / 2**20:.0f} MiB", parts))
    return ("## Width allocation of prunekit shrink (Fisher scores, MLP neurons and KV groups, before recovery)\n\n"
            + markdown_table(["ratio", "allocation", "removed", "test perplexity", "fitness KL", "search wall",
                              "prune wall", "peak RSS", "search parts"], table)
            + "\n\nPrune wall: the whole width pruning (Fisher scoring, search, shrinking). Search settings: "
            f"`{json.dumps(SHRINK_SEARCH)}` unless `settings` in the JSON says otherwise; the evolution starts from "
            "the knapsack's widths. Removed: the fraction of the parameters actually removed.\n\n")


def _markdown(data: dict) -> str:
    rows = []
    shrink_rows = [row for row in data["rows"].values() if row.get("kind") == "shrink"]
    weight_rows = [row for row in data["rows"].values() if row.get("kind") != "shrink"]
    for row in sorted(weight_rows, key=lambda r: ROWS.index(r["row"]) if r["row"] in ROWS else 99):
        search = row["search"]
        parts = ""
        if search:
            seconds = search["seconds"]
            parts = (f"database {seconds['database']:.0f} s{' (reused)' if search['database']['reused'] else ''}, "
                     f"unit costs {seconds['unit_costs']:.0f} s, search {seconds['search']:.0f} s (costs included)")
            if search.get("fitness") is not None:
                parts += f"; KL {search['start_fitness']:.4f} → {search['fitness']:.4f}, {search['evaluations']} candidates"
        rows.append((row["method"], row["allocation"], f"{row['perplexity']:.2f}", f"{row['fitness_kl']:.4f}",
                     f"{row['search_seconds']:.0f} s" if search else "–", f"{row['prune_seconds']:.0f} s",
                     f"{row['peak_rss_bytes'] / 2**20:.0f} MiB", parts or "–"))
    table = markdown_table(["method", "allocation", "test perplexity", "fitness KL", "search wall", "prune wall",
                            "peak RSS", "search parts"], rows)
    return (f"# Allocation by search on SmolLM2-135M\n\nWeight pruning at {RATIO:.0%}:\n\n{table}\n\n"
            f"Protocol: {PROTOCOL.summary()}. Fitness KL: mean KL(dense ‖ pruned) over the {FITNESS_TOKENS} tokens of "
            "the first calibration windows, the same for every row. Search settings: the defaults of "
            "`knapsack` / `evolutionary` (levels 0..0.9 by 0.1, one unit per attention and per MLP, KL costs on "
            "512 tokens; 20 generations of 8 offspring, stages of 512 and 2048 tokens keeping 2 then 1) unless "
            "`settings` in the JSON says otherwise. Peak RSS: the process's, sampled during the pruning call.\n\n"
            + (_shrink_markdown(shrink_rows) if shrink_rows else "")
            + f"Environment: {json.dumps(data.get('environment', {}))}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS + SHRINK_ROWS)}")
    parser.add_argument("--model", default=None, help="another model directory (a quick check of the script)")
    parser.add_argument("--ratio", type=float, default=RATIO)
    parser.add_argument("--database", type=Path, default=Path("/tmp/prunekit-allocation-search-db"))
    parser.add_argument("--allocation-arg", action="append", default=[], help="KEY=JSON for the searches")
    parser.add_argument("--out", type=Path, default=RESULTS / "allocation_search_smollm2")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON; run nothing")
    args = parser.parse_args()
    if args.report_only:
        args.out.with_suffix(".md").write_text(_markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.allocation_arg)}
    print(f"protocol: {PROTOCOL.summary()}; ratio {args.ratio}; fitness on {FITNESS_TOKENS} calibration tokens",
          flush=True)
    json_path = args.out.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    torch.manual_seed(0)
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if row not in ROWS + SHRINK_ROWS:
            raise SystemExit(f"unknown row {row}; choose from {', '.join(ROWS + SHRINK_ROWS)}")
        if row in SHRINK_ROWS:
            measured = run_shrink_row(row, args.model, args.database, extra)
        else:
            measured = run_row(row, args.model, args.database, args.ratio, extra)
        measured["settings"] = extra
        print(json.dumps({k: v for k, v in measured.items() if k not in ("search", "widths")}), flush=True)
        # another invocation may have written rows meanwhile: merge into what is on disk now
        data = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
        data["rows"][row] = measured
        data["environment"] = environment()
        write_json(json_path, data)
        args.out.with_suffix(".md").write_text(_markdown(data))


if __name__ == "__main__":
    main()
