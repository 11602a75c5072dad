"""Structural pruning of SmolLM2-135M: prunekit against Torch-Pruning, recovery, depth against width.

Every run loads the model fresh, prunes it, and measures: perplexity on the pinned wiki protocol
(40 windows of 512 tokens, the test split), parameters, CPU tokens/s at batch 1 and 8 (forward
passes over 128-token sequences, median of 5 after 2 warm-ups, 2 threads), and the wall time of
the pruning call (calibration and gradients included). Phases, one process each, under the lock
(raw results in benchmarks/results/raw/structure_smollm2/):

    flock /tmp/prunekit-cpu.lock python benchmarks/structure_smollm2.py dense
    flock /tmp/prunekit-cpu.lock python benchmarks/structure_smollm2.py prune --tool torch-pruning --importance l2 --ratio 0.2
    flock /tmp/prunekit-cpu.lock python benchmarks/structure_smollm2.py prune --tool prunekit --importance l2 --ratio 0.2 --mlp-only
    flock /tmp/prunekit-cpu.lock python benchmarks/structure_smollm2.py prune --tool prunekit --importance flap --ratio 0.2 --recover 600
    flock /tmp/prunekit-cpu.lock python benchmarks/structure_smollm2.py depth --blocks 6 --criterion influence
    python benchmarks/structure_smollm2.py report

"--mlp-only" removes MLP neurons only, the same number in every layer (the setting of the issue's
anchor measurement, and all Torch-Pruning runs here); without it prunekit ranks MLP neurons and
KV groups of all layers together (global allocation).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402

from prunekit.core.text import TextProtocol, calibration_windows, random_windows, source_text, test_windows, tokenize  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.evaluate.resources import Measured  # noqa: E402
from prunekit.models.base import adapter_for  # noqa: E402
from prunekit.models.loading import load_causal_lm  # noqa: E402
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure  # noqa: E402
from prunekit.structure.depth import prune_depth  # noqa: E402
from prunekit.structure.measure import SpeedProtocol, count_parameters, lm_inputs, measure  # noqa: E402
from prunekit.structure.recovery import recover_lm  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results"
RAW = ROOT / "raw" / "structure_smollm2"
PROTOCOL = TextProtocol()
SPEED = SpeedProtocol(batch_sizes=(1, 8), runs=5, warmup=2, threads=2, seq_len=128)
RECOVERY_SAMPLES = 512


def _load():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lm = load_causal_lm(None)
    return lm, calibration_windows(lm.tokenizer, PROTOCOL), test_windows(lm.tokenizer, PROTOCOL)


def _measure(model, tokenizer, test) -> dict:
    result = {"parameters": count_parameters(model), "perplexity": perplexity(model, test).perplexity}
    result["speed"] = measure(model, lm_inputs(SPEED.seq_len, model.get_input_embeddings().num_embeddings), SPEED.seq_len,
                              SPEED, unit="tokens").to_dict()
    return result


def dense() -> None:
    lm, _, test = _load()
    result = {"name": "dense", **_measure(lm.model, lm.tokenizer, test), "protocol": PROTOCOL.describe(),
              "speed_protocol": SPEED.describe(), "environment": environment()}
    RAW.mkdir(parents=True, exist_ok=True)
    write_json(RAW / "dense.json", result)
    print(json.dumps({k: result[k] for k in ("parameters", "perplexity")}))


def _neurons_for(model, ratio: float) -> int:
    """MLP neurons removed from every layer so that ``ratio`` of all parameters go (MLP only)."""
    layers = model.model.layers
    per_neuron = 3 * model.config.hidden_size
    return math.ceil(ratio * count_parameters(model) / (len(layers) * per_neuron))


def _torch_pruning(model, importance: str, ratio: float, calibration: torch.Tensor) -> dict:
    import torch_pruning as tp

    criteria = {"l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                "taylor": lambda: tp.importance.GroupTaylorImportance(),
                "hessian": lambda: tp.importance.GroupHessianImportance()}
    criterion = criteria[importance]()
    width = model.config.intermediate_size
    neurons = _neurons_for(model, ratio)
    # Only MLP neurons: every other Linear is ignored, so the only groups left are gate/up rows + down columns.
    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        attention = layer.self_attn
        ignored += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, layer.mlp.down_proj]
    example = calibration[:1, :64]
    model.config.use_cache = False
    pruner = tp.pruner.MetaPruner(model, example, importance=criterion, global_pruning=False,
                                  pruning_ratio=(neurons - 0.5) / width, ignored_layers=ignored)
    if importance in ("taylor", "hessian"):
        model.zero_grad()
        for index in range(calibration.shape[0]):
            window = calibration[index:index + 1]
            loss = model(input_ids=window, labels=window).loss
            loss.backward()
            if importance == "hessian":
                criterion.accumulate_grad(model)
                model.zero_grad()
    pruner.step()
    model.zero_grad()
    for layer in model.model.layers:
        layer.mlp.intermediate_size = layer.mlp.down_proj.in_features
    model.config.intermediate_size = model.model.layers[0].mlp.down_proj.in_features
    return {"neurons_removed_per_layer": neurons, "kept": model.config.intermediate_size}


def _prunekit(model, importance: str, ratio: float, calibration: torch.Tensor, mlp_only: bool, heads: str) -> dict:
    if mlp_only:
        settings = {"granularity": "channels", "allocation": {"name": "uniform", "round_to": 1, "floor": 0.0}}
    else:
        settings = {"granularity": "channels,heads", "allocation": {"name": "global", "round_to": 8, "floor": 0.1},
                    "head_mode": heads}
    result = prune_structure(model, ratio, example_inputs=lm_example_inputs(), importance=importance,
                             calibration=lm_calibration(calibration), **settings)
    return {"plan": result.plan.to_dict(), "seconds": result.seconds, "notes": result.notes,
            "allocation": result.allocation}


def _recover(lm, dense_model, seconds: float) -> tuple[dict, float]:
    text = tokenize(lm.tokenizer, source_text(PROTOCOL.calibration, "calibration", PROTOCOL))
    train = random_windows(text, RECOVERY_SAMPLES, PROTOCOL.seq_len, PROTOCOL.seed + 1)
    result = recover_lm(lm.model, train, dense_model, "distill", max_seconds=seconds, lr=1e-4, batch_size=1)
    return result.to_dict(), 0.0


def prune(tool: str, importance: str, ratio: float, mlp_only: bool, heads: str, recover: float) -> None:
    lm, calibration, test = _load()
    teacher = copy.deepcopy(lm.model) if recover else None
    with Measured() as pruning:
        details = (_torch_pruning(lm.model, importance, ratio, calibration) if tool == "torch-pruning"
                   else _prunekit(lm.model, importance, ratio, calibration, mlp_only, heads))
    name = f"{tool}-{importance}-{'mlp' if (mlp_only or tool == 'torch-pruning') else 'global-' + heads}-{ratio:g}"
    result = {"name": name, "tool": tool, "importance": importance, "ratio": ratio,
              "scope": "MLP neurons, uniform" if (mlp_only or tool == "torch-pruning") else f"MLP neurons + heads ({heads}), global",
              "prune_seconds": pruning.seconds, "prune_peak_rss": pruning.peak_rss, "details": details,
              **_measure(lm.model, lm.tokenizer, test)}
    if recover:
        recovery, _ = _recover(lm, teacher, recover)
        del teacher
        result["recovery"] = recovery
        result["perplexity_recovered"] = perplexity(lm.model, test).perplexity
        name += f"-recover{recover:g}"
        result["name"] = name
    result["environment"] = environment()
    RAW.mkdir(parents=True, exist_ok=True)
    write_json(RAW / f"{name}.json", result)
    print(json.dumps({k: result[k] for k in ("name", "parameters", "perplexity", "prune_seconds")}
                     | ({"perplexity_recovered": result["perplexity_recovered"]} if recover else {})))


def depth(blocks: int, criterion: str) -> None:
    lm, calibration, test = _load()
    adapter = adapter_for(lm.model)
    evaluate = None
    if criterion == "perplexity":
        windows = calibration[:8]

        def evaluate(model) -> float:
            return math.log(perplexity(model, windows).perplexity)
    with Measured() as pruning:
        result_depth = prune_depth(lm.model, adapter.blocks_path, blocks, criterion,
                                   lm_calibration(calibration).batches, evaluate)
    result = {"name": f"depth-{criterion}-{blocks}", "tool": "prunekit", "importance": f"depth ({criterion})",
              "ratio": None, "scope": f"{blocks} of {result_depth.blocks_before} blocks",
              "prune_seconds": pruning.seconds, "details": result_depth.to_dict(), **_measure(lm.model, lm.tokenizer, test),
              "environment": environment()}
    RAW.mkdir(parents=True, exist_ok=True)
    write_json(RAW / f"{result['name']}.json", result)
    print(json.dumps({k: result[k] for k in ("name", "parameters", "perplexity", "prune_seconds")}))


def report() -> None:
    dense_run = json.loads((RAW / "dense.json").read_text())
    base_params = dense_run["parameters"]
    base_speed = dense_run["speed"]["throughput"]
    rows = [("dense", "–", "–", f"{base_params:,}", "0 %", f"{dense_run['perplexity']:.2f}", "1.00×", "–",
             f"{base_speed['1']:.0f}", f"{base_speed['8']:.0f}", "1.00×", "1.00×", "–")]
    runs = []
    for path in sorted(RAW.glob("*.json")):
        if path.name == "dense.json":
            continue
        run = json.loads(path.read_text())
        runs.append(run)
    runs.sort(key=lambda r: (r.get("ratio") or 0, r["tool"], r["name"]))
    for run in runs:
        speed = run["speed"]["throughput"]
        removed = 1 - run["parameters"] / base_params
        recovered = run.get("perplexity_recovered")
        rows.append((run["tool"], run["importance"], run["scope"], f"{run['parameters']:,}", f"{removed:.1%}",
                     f"{run['perplexity']:,.2f}", f"{run['perplexity'] / dense_run['perplexity']:,.2f}×",
                     f"{recovered:.2f} ({recovered / dense_run['perplexity']:.2f}×, "
                     f"{run['recovery']['seconds']:.0f} s)" if recovered else "–",
                     f"{speed['1']:.0f}", f"{speed['8']:.0f}", f"{speed['1'] / base_speed['1']:.2f}×",
                     f"{speed['8'] / base_speed['8']:.2f}×", f"{run['prune_seconds']:.0f}"))
    headers = ["tool", "importance", "what is removed", "parameters", "removed", "perplexity", "vs dense",
               "after recovery", "tok/s b1", "tok/s b8", "speedup b1", "speedup b8", "prune s"]
    table = markdown_table(headers, rows)
    text = (f"# SmolLM2-135M structural pruning\n\n{table}\n\nPerplexity: {PROTOCOL.summary()}.\n\n"
            f"Speed: {SPEED.describe()}.\n")
    write_json(ROOT / "structure_smollm2.json", {"dense": dense_run, "runs": runs, "protocol": PROTOCOL.describe(),
                                                 "speed_protocol": SPEED.describe()})
    (ROOT / "structure_smollm2.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    sub.add_parser("dense")
    prune_parser = sub.add_parser("prune")
    prune_parser.add_argument("--tool", choices=["prunekit", "torch-pruning"], required=True)
    prune_parser.add_argument("--importance", required=True)
    prune_parser.add_argument("--ratio", type=float, required=True)
    prune_parser.add_argument("--mlp-only", action="store_true")
    prune_parser.add_argument("--heads", choices=["kv", "query"], default="kv")
    prune_parser.add_argument("--recover", type=float, default=0.0, help="seconds of distillation after pruning")
    depth_parser = sub.add_parser("depth")
    depth_parser.add_argument("--blocks", type=int, default=6)
    depth_parser.add_argument("--criterion", choices=["influence", "perplexity"], default="influence")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.phase == "dense":
        dense()
    elif args.phase == "prune":
        prune(args.tool, args.importance, args.ratio, args.mlp_only, args.heads, args.recover)
    elif args.phase == "depth":
        depth(args.blocks, args.criterion)
    else:
        report()


if __name__ == "__main__":
    main(sys.argv[1:])
