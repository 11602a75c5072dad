"""Allocation by measurement and search (issue 18) on SmolLM2-135M: uniform and OWL against the knapsack
and the evolutionary search, for Wanda and SparseGPT at 70 % and 60 %; widths of prunekit shrink; which blocks
to remove.

One row per invocation keeps each run under ten minutes on the shared CPU (run them under the lock):

    flock /tmp/prunekit-cpu.lock python benchmarks/allocation_search_smollm2.py --rows wanda-uniform
    flock /tmp/prunekit-cpu.lock python benchmarks/allocation_search_smollm2.py --rows wanda-knapsack --ratio 0.6
    flock /tmp/prunekit-cpu.lock python benchmarks/allocation_search_smollm2.py --rows depth6-knapsack

Weight rows are kept per ratio: ``--rows wanda-owl --ratio 0.6`` is stored as ``wanda-owl@0.6`` beside
``wanda-owl@0.7``, and the Markdown has one table per ratio. A search row whose level database was computed over
the reference stream (``prunekit.weights.search.database``: the default for SparseGPT, which updates the kept
weights) is stored as ``sparsegpt-knapsack@0.7+reference`` beside the dense-stream row measured before that stream
existed (or with ``--allocation-arg database_stream=dense``); the table says which stream each row's database used,
and, where the search ran its sequential check (``prunekit.weights.search.run``), both allocations' KL once pruned
sequentially and which one the search returned.

A search row that runs out of time can be run again: the level database (per block), the unit costs (per unit)
and the evolution (per generation) are kept in ``--database`` and resume; ``search_seconds`` then counts only
the last invocation, and ``search_parts`` says what each part took when it was computed.

Every weight row: the model pruned in memory exactly as ``prunekit prune --method M --ratio R --allocation A`` does
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
Depth rows (``depth6-influence``, ``depth6-perplexity``, ``depth6-knapsack``, ``depth6-evolutionary``): 6 of the
30 blocks removed in memory exactly as ``prunekit shrink --ratio 0 --depth 6 --depth-criterion influence|perplexity``
or ``--depth-criterion search --depth-search knapsack|evolutionary`` does (the shrink job's own depth step,
``prunekit.structure.job._depth``; ``--allocation-arg`` settings become the search's, as a recipe's
``depth.search``), measured before any recovery on the same protocol and fitness KL; the blocks removed are in the
JSON and the table. The depth search keeps no state between invocations, so its row must fit one; the
evolution's row was run with ``--allocation-arg generations=6 --allocation-arg 'stage_tokens=[2048]'
--allocation-arg 'survivors=[]'`` (the defaults' first 6 generations: both default stages measure the same batch).

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
from prunekit.core.allocation.fitness import KLMeter, fitness_windows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL = TextProtocol()
RATIO = 0.7
FITNESS_TOKENS = 2048
# No `global` rows: prunekit refuses a global threshold for Wanda and SparseGPT, whose scores compare only within
# a layer (weights.pipeline.plan_pruning), so uniform and OWL are the heuristics these methods can take.
ALLOCATIONS = {"uniform": "uniform", "owl": "owl", "knapsack": {"name": "knapsack"},
               "evolutionary": {"name": "evolutionary"}}
ROWS = [f"{method}-{allocation}" for method in ("wanda", "sparsegpt") for allocation in ALLOCATIONS]
KNOWN = {"wanda-uniform": 585.54, "wanda-owl": 567.87, "sparsegpt-uniform": 199.68, "sparsegpt-owl": 185.32,
         "shrink20-global": 42.87,  # docs/structure.md: the default `prunekit shrink --ratio 0.2`
         "depth6-influence": 48.70, "depth6-perplexity": 51.73}  # issue 18: the two rankings "today"
# Width search for prunekit shrink: a level removes a tenth of a family (152 of 1536 neurons, or one of 3 KV
# groups), at most 0.8 (the KV groups stop at their floor, 2 of 3); costs on 256 tokens; 16 generations of 6
# offspring, selected on 256 then 1024 tokens. Shared by both ratios, so the unit costs are measured once.
SHRINK_SEARCH = {"step": 0.1, "max_ratio": 0.8, "sensitivity_tokens": 256, "generations": 16, "offspring": 6,
                 "stage_tokens": [256, 1024], "survivors": [2]}
# evolutionary: shrink's default evolution, from the global allocation on the rounding grid (no step);
# evolutionary-from-knapsack: from the knapsack's solution on SHRINK_SEARCH's coarse grid.
SHRINK_ROWS = [f"shrink{percent}-{allocation}" for percent in (20, 40)
               for allocation in ("global", "knapsack", "evolutionary-from-knapsack", "evolutionary")]
DEPTH_ROWS = [f"depth6-{criterion}" for criterion in ("influence", "perplexity", "knapsack", "evolutionary")]
SEARCHES = ("knapsack", "evolutionary")


def row_key(row: str, ratio: float, stream: str = "dense") -> str:
    """Where a weight row's result is kept: its name and ratio (``wanda-owl@0.7``), so ratios stay apart, and a
    search over the reference stream's database beside one over the dense stream's."""
    return f"{row}@{ratio:g}" + ("" if stream == "dense" else f"+{stream}")


def database_stream(row: dict) -> str | None:
    """The stream a search row's level database was computed over (rows measured before the choice existed were
    dense); None for a row without a search."""
    search = row.get("search")
    return None if not search else search["database"].get("stream", "dense")


def _keyed(data: dict) -> dict:
    """Results of weight rows written before rows were keyed by ratio (``wanda-owl``) under their ratio's key;
    the measurements themselves are unchanged."""
    rows = {}
    for key, row in data.get("rows", {}).items():
        if row.get("kind") not in ("shrink", "depth") and "@" not in key:
            key = row_key(row["row"], row["ratio"])
        rows[key] = row
    return {**data, "rows": rows}


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
    stream = "dense" if search is None else search.database["stream"]
    return {"row": row, "key": row_key(row, ratio, stream), "method": method, "allocation": allocation_name, "ratio": ratio,
            "achieved_ratio": result.achieved_sparsity, "perplexity": ppl, "fitness_kl": fitness,
            "search_seconds": searched - started if search else 0.0, "prune_seconds": finished - searched,
            "peak_rss_bytes": measured.peak_rss,
            "search": None if search is None else {k: v for k, v in search.to_dict().items() if k != "levels"},
            "known_perplexity": KNOWN.get(row) if abs(ratio - RATIO) < 1e-9 else None}


def run_shrink_row(row: str, model_path: str | None, database: Path, extra: dict) -> dict:
    """One shrink row: ``prunekit shrink --ratio R [--allocation A]``'s width pruning, before recovery."""
    from prunekit.structure.pipeline import lm_calibration, lm_example_inputs, prune_structure
    from prunekit.structure.recipe import ShrinkRecipe

    percent, allocation_name = row.removeprefix("shrink").split("-", 1)
    ratio = int(percent) / 100
    from_knapsack = allocation_name == "evolutionary-from-knapsack"
    allocation_name = allocation_name.removesuffix("-from-knapsack")
    allocation: dict = {"name": allocation_name}
    if allocation_name != "global":
        fields = ALLOCATIONS_REGISTRY.get(allocation_name).model_fields
        search = {**SHRINK_SEARCH, **extra, "database": str(database / "shrink")}
        if allocation_name == "evolutionary":
            if from_knapsack:
                search["start"] = "knapsack"
            else:  # the default start, the global widths, searches on the rounding grid: no step
                search = {k: v for k, v in search.items() if k not in ("step", "max_ratio")}
        allocation["search"] = {k: v for k, v in search.items() if k in fields}
    recipe = ShrinkRecipe(ratio=ratio, allocation=allocation).with_default_importance("causal-lm")

    def shrink(loaded, calibration):
        return prune_structure(loaded.model, example_inputs=lm_example_inputs(), settings=recipe.width_settings(),
                               calibration=lm_calibration(calibration, recipe.batch_size),
                               adapter=adapter_for(loaded.model))

    result, measured = _measure_structural(recipe, model_path, shrink)
    search = result.search
    return {"row": row, "kind": "shrink", "method": f"shrink ({recipe.importance['name']})",
            "allocation": allocation_name, "ratio": ratio, **measured,
            "search_seconds": result.seconds.get("search_seconds", 0.0),
            "search": None if search is None else {k: v for k, v in search.items() if k != "units"},
            "widths": {name: kept for name, (_, kept) in result.plan.widths.items()},
            "known_perplexity": KNOWN.get(row)}


def _measure_structural(recipe, model_path: str | None, apply) -> tuple[object, dict]:
    """Load the model, ``apply(loaded, calibration)`` as the shrink job would (seeded as it is), and measure the
    result on the benchmark's protocol: what ``apply`` returned and the row's common figures."""
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
        result = apply(loaded, calibration)
        finished = time.perf_counter()
    after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    fitness = meter.kl()
    del meter
    return result, {"achieved_ratio": 1 - after / before, "parameters_after": after,
                    "perplexity": perplexity(model, test, 4, "Perplexity").perplexity, "fitness_kl": fitness,
                    "prune_seconds": finished - started, "peak_rss_bytes": measured.peak_rss}


def run_depth_row(row: str, model_path: str | None, extra: dict) -> dict:
    """One depth row: ``prunekit shrink --ratio 0 --depth N --depth-criterion C [--depth-search S]``'s depth step
    (the job's own ``_depth``), before recovery; ``extra``: settings of the search (a recipe's ``depth.search``)."""
    from prunekit.structure.job import _depth
    from prunekit.structure.recipe import ShrinkRecipe

    count, criterion = row.removeprefix("depth").split("-", 1)
    depth: dict = {"blocks": int(count), "criterion": criterion}
    if criterion in SEARCHES:
        fields = ALLOCATIONS_REGISTRY.get(criterion).model_fields
        settings = {k: v for k, v in extra.items() if k in fields}
        depth = {**depth, "criterion": "search", "search": {"name": criterion, **settings} if settings else criterion}
    recipe = ShrinkRecipe(ratio=0, depth=depth).with_default_importance("causal-lm")
    result, measured = _measure_structural(
        recipe, model_path, lambda loaded, calibration: _depth(loaded, adapter_for(loaded.model), recipe, calibration))
    searched = criterion in SEARCHES
    return {"row": row, "kind": "depth", "method": "depth", "criterion": result.criterion,
            "allocation": criterion, "depth": recipe.depth.model_dump(mode="json"),
            "blocks_before": result.blocks_before, "blocks_after": result.blocks_after, "removed": result.removed,
            "scores": result.scores, "notes": result.notes, **measured,
            "search_seconds": measured["prune_seconds"] if searched else 0.0, "search": None,
            "known_perplexity": KNOWN.get(row)}


def _depth_markdown(rows: list[dict]) -> str:
    table = []
    for row in sorted(rows, key=lambda r: DEPTH_ROWS.index(r["row"]) if r["row"] in DEPTH_ROWS else 99):
        searched = row["allocation"] in SEARCHES
        settings = row["depth"]["search"]
        criterion = row["allocation"]
        if searched:
            criterion = f"search ({settings if isinstance(settings, str) else json.dumps(settings)})"
        table.append((criterion, ", ".join(str(i) for i in row["removed"]), f"{row['achieved_ratio']:.4f}",
                      f"{row['perplexity']:.2f}", f"{row['fitness_kl']:.4f}",
                      f"{row['search_seconds']:.0f} s" if searched else "–", f"{row['prune_seconds']:.0f} s",
                      f"{row['peak_rss_bytes'] / 2**20:.0f} MiB",
                      "; ".join(row["notes"]) or "–"))
    counts = {(row["blocks_before"] - row["blocks_after"], row["blocks_before"]) for row in rows}
    title = ", ".join(f"{removed} of {total}" for removed, total in sorted(counts))
    last = max(total for _, total in counts) - 1
    return (f"## Depth: {title} blocks removed, before recovery\n\n"
            + markdown_table(["criterion", "blocks removed", "parameters removed", "test perplexity", "fitness KL",
                              "search wall", "prune wall", "peak RSS", "search"], table)
            + "\n\nAs `prunekit shrink --ratio 0 --depth 6 --depth-criterion influence|perplexity` or "
            "`--depth-criterion search --depth-search knapsack|evolutionary` does (the job's own depth step; a search "
            "named without settings takes the allocation's defaults, with settings as a recipe's `depth.search` "
            f"gives them). Blocks numbered 0–{last}. The search measures KL(dense ‖ blocks skipped) on the shrink "
            "job's first calibration batch (4 windows, 2048 tokens: every stage of up to 2048 tokens measures all of "
            "them), which are the fitness KL's tokens: its fitness KL is in-sample, the test perplexity is not. "
            "An evolution shown with its settings ran them instead of the defaults (20 generations, stages of 512 and "
            "2048 tokens): the depth search keeps no state between runs, so it must fit one run of this benchmark "
            "(under 8 minutes on the shared 2 cores), which the defaults do not; one stage of 2048 tokens selects "
            "exactly as the default two stages do here (both measure the same batch), so it is the default search "
            "stopped after its first generations. "
            "Prune wall: the whole depth step (scoring or search, then removal); search wall the same for the "
            "searches. Influence: 1 − cos(block input, output) on the calibration windows; perplexity: the loss "
            "rise with each block skipped alone, on 8 calibration windows.\n\n")


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
        table.append((f"{row['ratio']:.0%}", row["row"].split("-", 1)[1], f"{row['achieved_ratio']:.4f}",
                      f"{row['perplexity']:.2f}", f"{row['fitness_kl']:.4f}",
                      f"{row['search_seconds']:.0f} s" if search else "–", f"{row['prune_seconds']:.0f} s",
                      f"{row['peak_rss_bytes'] / 2**20:.0f} MiB", parts))
    return ("## Width allocation of prunekit shrink (Fisher scores, MLP neurons and KV groups, before recovery)\n\n"
            + markdown_table(["ratio", "allocation", "removed", "test perplexity", "fitness KL", "search wall",
                              "prune wall", "peak RSS", "search parts"], table)
            + "\n\nPrune wall: the whole width pruning (Fisher scoring, search, shrinking). Search settings: "
            f"`{json.dumps(SHRINK_SEARCH)}` unless `settings` in the JSON says otherwise; `evolutionary` (shrink's default evolution) starts from "
            "the global allocation's widths on the families' rounding grid (8 neurons, one KV group a level; no step, "
            "max_ratio 0.9), `evolutionary-from-knapsack` from the knapsack's widths on the step grid. Removed: the fraction of the parameters actually removed.\n\n")


def _weights_markdown(rows: list[dict], ratio: float) -> str:
    table = []
    for row in sorted(rows, key=lambda r: (ROWS.index(r["row"]) if r["row"] in ROWS else 99,
                                           database_stream(r) == "reference")):
        search = row["search"]
        parts = ""
        stream = database_stream(row)
        if stream == "reference":
            database = search["database"]
            stream = f"reference ({database['reference_ratio']:g}, {database['sequential']})"
        if search:
            seconds = search["seconds"]
            parts = (f"database {seconds['database']:.0f} s{' (reused)' if search['database']['reused'] else ''}, "
                     f"unit costs {seconds['unit_costs']:.0f} s, search {seconds['search']:.0f} s (costs included)")
            if search.get("fitness") is not None:
                parts += f"; KL {search['start_fitness']:.4f} → {search['fitness']:.4f}, {search['evaluations']} candidates"
            check = search.get("sequential_check")
            if check:
                parts += (f"; sequential check {seconds['sequential_check']:.0f} s on {check['tokens']} tokens: "
                          f"{check['start']} {check['start_kl']:.4f}, found {check['found_kl']:.4f}, "
                          f"returned {check['start'] if check['kept'] == 'start' else 'found'}")
        table.append((row["method"], row["allocation"], stream or "–", f"{row['perplexity']:.2f}",
                      f"{row['fitness_kl']:.4f}", f"{row['search_seconds']:.0f} s" if search else "–",
                      f"{row['prune_seconds']:.0f} s", f"{row['peak_rss_bytes'] / 2**20:.0f} MiB", parts or "–"))
    return (f"## Weight pruning at {ratio:.0%} of the targeted layers' weights\n\n"
            + markdown_table(["method", "allocation", "database stream", "test perplexity", "fitness KL",
                              "search wall", "prune wall", "peak RSS", "search parts"], table) + "\n\n")


def _markdown(data: dict) -> str:
    data = _keyed(data)
    shrink_rows = [row for row in data["rows"].values() if row.get("kind") == "shrink"]
    depth_rows = [row for row in data["rows"].values() if row.get("kind") == "depth"]
    weight_rows = [row for row in data["rows"].values() if row.get("kind") not in ("shrink", "depth")]
    ratios = sorted({row["ratio"] for row in weight_rows}, reverse=True)
    weights = "".join(_weights_markdown([row for row in weight_rows if row["ratio"] == ratio], ratio)
                      for ratio in ratios)
    return ("# Allocation by search on SmolLM2-135M\n\n"
            f"Protocol: {PROTOCOL.summary()}. Fitness KL: mean KL(dense ‖ pruned) over the {FITNESS_TOKENS} tokens of "
            "the first calibration windows, the same for every row of every table. Peak RSS: the process's, "
            "sampled during the pruning call. Each table states its own ratio or budget.\n\n"
            + weights
            + ("Weight search settings: the defaults of `knapsack` / `evolutionary` (levels 0..0.9 by 0.1, one unit "
               "per attention and per MLP, KL costs on 512 tokens; 20 generations of 8 offspring, stages of 512 and "
               "2048 tokens keeping 2 then 1) unless `settings` in the JSON says otherwise. Database stream: the "
               "calibration inputs the level database pruned every layer from: the dense model's, or the reference "
               "stream's (every earlier layer pruned at the ratio uniformly, in the pipeline's sequential mode; "
               "the default for SparseGPT since the stream existed, the dense rows of SparseGPT were measured "
               "before). A dense-stream database and its unit costs depend on the method and the calibration, not "
               "on the ratio: every ratio's searches read the same ones; a reference-stream database belongs to its "
               "ratio. Sequential check: after the search, the search's start (the evolution's: the knapsack's "
               "levels; the knapsack's: uniform) and its found levels pruned as `prune` prunes them and measured "
               "on the last stage's tokens; the search returns the better (on by default with the reference "
               "stream); its wall time is part of the search wall.\n\n" if weight_rows else "")
            + (_shrink_markdown(shrink_rows) if shrink_rows else "")
            + (_depth_markdown(depth_rows) if depth_rows else "")
            + f"Environment: {json.dumps(data.get('environment', {}))}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = ROWS + SHRINK_ROWS + DEPTH_ROWS
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(every)}")
    parser.add_argument("--model", default=None, help="another model directory (a quick check of the script)")
    parser.add_argument("--ratio", type=float, default=RATIO, help="of the weight rows (shrink and depth rows "
                                                                   "name their own budget)")
    parser.add_argument("--database", type=Path, default=Path("/tmp/prunekit-allocation-search-db"))
    parser.add_argument("--allocation-arg", action="append", default=[], help="KEY=JSON for the searches")
    parser.add_argument("--out", type=Path, default=RESULTS / "allocation_search_smollm2")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON; run nothing")
    args = parser.parse_args()
    json_path = args.out.with_suffix(".json")
    if args.report_only:
        args.out.with_suffix(".md").write_text(_markdown(json.loads(json_path.read_text())))
        return
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.allocation_arg)}
    print(f"protocol: {PROTOCOL.summary()}; fitness on {FITNESS_TOKENS} calibration tokens", flush=True)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        if row not in every:
            raise SystemExit(f"unknown row {row}; choose from {', '.join(every)}")
    torch.manual_seed(0)
    for row in rows:
        if row in SHRINK_ROWS:
            print(f"{row}: shrink to {int(row.removeprefix('shrink').split('-')[0])} % fewer parameters", flush=True)
            measured, key = run_shrink_row(row, args.model, args.database, extra), row
        elif row in DEPTH_ROWS:
            print(f"{row}: remove {int(row.removeprefix('depth').split('-')[0])} blocks", flush=True)
            measured, key = run_depth_row(row, args.model, extra), row
        else:
            print(f"{row}: weight ratio {args.ratio}", flush=True)
            measured = run_row(row, args.model, args.database, args.ratio, extra)
            key = measured["key"]
        measured["settings"] = extra
        print(json.dumps({k: v for k, v in measured.items() if k not in ("search", "widths", "scores")}), flush=True)
        # another invocation may have written rows meanwhile: merge into what is on disk now
        data = _keyed(json.loads(json_path.read_text())) if json_path.exists() else {"rows": {}}
        data["rows"][key] = measured
        data["environment"] = environment()
        write_json(json_path, data)
        args.out.with_suffix(".md").write_text(_markdown(data))


if __name__ == "__main__":
    main()
