"""Structural pruning of SmolLM2-135M: prunekit against Torch-Pruning 1.6.1, recovery, depth against width.

Every run loads the model fresh in its own process, prunes it, and measures: perplexity on the pinned
wiki protocol (40 windows of 512 tokens, the test split), parameters, CPU tokens/s at batch 1 and 8
(forward passes over 128-token sequences, median of 5 after 2 warm-ups, 2 threads; a pruned model is
timed side by side with a fresh unpruned copy, their passes alternating), and the wall time
of the pruning call (calibration and gradients included). Raw results go to
benchmarks/results/raw/structure_smollm2/, one JSON file per run; the report to
benchmarks/results/structure_smollm2.{md,json}.

The whole benchmark, resumable (a run whose result file exists is skipped; each run is a fresh process,
each under the CPU lock):

    pip install --no-deps torch-pruning==1.6.1      # --no-deps keeps the installed torch
    python benchmarks/structure_smollm2.py all --lock /tmp/prunekit-cpu.lock

Runs, in order (``python benchmarks/structure_smollm2.py plan`` lists them with their commands):

- ``dense``: the unpruned model;
- at 20 % and at 40 % of all parameters removed:
  - Torch-Pruning with magnitude (L2 group norm), Taylor and Hessian importance;
  - prunekit with magnitude (``l2``) in the same setting as Torch-Pruning: MLP neurons only, the same
    number from every layer (``--mlp-only``);
  - prunekit with Taylor in the same setting as Torch-Pruning's Taylor (``--mlp-only``);
  - prunekit's best, chosen by measurement at 20 % (see docs/structure.md): Fisher (half the mean
    squared gradient of each neuron's mask over the calibration windows: a loss estimate, ranked across
    layers as is), MLP neurons of all layers ranked together, every layer keeping at least 30 %
    (``--mlp-global 0.3``, widths rounded to 8), each ``down_proj`` then refitted by least squares on the
    calibration activations (``--reconstruct``), without and with a recovery of at most 600 s (the plain
    LM loss at lr 3e-4); the same with first-order Taylor (|w · ∂L/∂w|, each layer's scores divided by
    their mean), the best before Fisher; at 20 % also recoveries training only the MLPs and norms
    (Fisher at lr 3e-4; Taylor at 2e-4, 3e-4 and 4e-4), and Taylor without the reconstruction
    (distillation, lr 1e-4);
  - FLAP (fluctuation × squared column norm, with bias compensation) with MLP neurons and key/value
    groups ranked together (floor 10 %), and with MLP neurons only (``--mlp-global 0.3``): measured
    alternatives, far worse on this model; Fisher with MLP neurons and key/value groups ranked together
    (floor 10 %, no refit): ``prunekit shrink``'s default for causal LMs;
- ``depth``: 6 of 30 blocks removed by block influence (1 − cos(input, output)), and by the measured
  perplexity change of skipping each block;
- ``equal``: prunekit's best width pruning at exactly the fraction of parameters that 6 blocks hold
  (computed from the model: 6 × 3,540,096 of 134,515,008 parameters, about 15.8 %);
- ``report``: the table, and each target of the issue checked (PASS/MISS with the figures):
  at 20 % removed, perplexity ≤ 3× dense without recovery and ≤ 1.5× after ≤ 600 s of recovery,
  and ≥ 1.15× throughput at batch 8; at 40 % removed, ≥ 1.25× throughput at batch 8 (perplexity
  before and after recovery reported).

Torch-Pruning runs remove MLP neurons only (attention and embeddings in ``ignored_layers``): its
dependency graph does not handle the grouped-query attention of Hugging Face Llama models.
A single run by hand, for example:

    flock /tmp/prunekit-cpu.lock python benchmarks/structure_smollm2.py prune --tool prunekit --importance fisher --ratio 0.2 --mlp-global 0.3 --reconstruct --recover 600 --recover-mode plain --recover-lr 3e-4 --recover-train-only "mlp.+norm"
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402

from phases import phase_command, print_plan, run_phases  # noqa: E402
from prunekit.core.text import TextProtocol, calibration_windows, random_windows, source_text, test_windows, tokenize  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.evaluate.resources import Measured  # noqa: E402
from prunekit.models.base import adapter_for  # noqa: E402
from prunekit.models.loading import load, load_model  # noqa: E402
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure  # noqa: E402
from prunekit.structure.depth import prune_depth  # noqa: E402
from prunekit.structure.measure import (SpeedProtocol, count_parameters, lm_inputs, measure,  # noqa: E402
                                        measure_side_by_side)
from prunekit.training.recovery import recover as recover_lm  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results"
RAW = ROOT / "raw" / "structure_smollm2"
PROTOCOL = TextProtocol()
SPEED = SpeedProtocol(batch_sizes=(1, 8), runs=5, warmup=2, threads=2, seq_len=128)
RECOVERY_SAMPLES = 512
RECOVERY_LR = 1e-4
RECOVERY_SECONDS = 600.0
RATIOS = (0.2, 0.4)
DEPTH_BLOCKS = 6
TORCH_PRUNING = ("l2", "taylor", "hessian")
BEST = "fisher"  # with BEST_FLOOR and reconstruction: the best of the settings measured at 20 % (docs/structure.md)
PREVIOUS_BEST = "taylor"  # the best before Fisher; its rows stay in the table
BEST_FLOOR = 0.3
# The recovery of the best rows: the plain LM loss at 3e-4 beat distillation at 1e-4 and 3e-4 and the plain loss
# at 6e-4 in 150 s A/B runs from one pruned start (benchmarks/structure_recovery_ab.py, docs/structure.md).
BEST_RECOVERY_MODE = "plain"
BEST_RECOVERY_LR = 3e-4
RECOVERY_TRAIN_ONLY = "mlp.+norm"
RECOVERY_TRAIN_ONLY_LRS = {"taylor": (2e-4, 3e-4, 4e-4), "fisher": (3e-4,)}  # the learning rate was flat for Taylor
TARGETS = {"perplexity_no_recovery": 3.0, "perplexity_recovered": 1.5, "speedup_b8": {0.2: 1.15, 0.4: 1.25}}


# ---- runs and their result files ---------------------------------------------------------------

def prune_name(tool: str, importance: str, ratio: float, mlp_only: bool, heads: str = "kv", recover: float = 0.0,
               mlp_global: float | None = None, reconstruct: bool = False, recover_lr: float | None = None,
               recover_mode: str = "distill", damping: float | None = None, train_only: str = "") -> str:
    recover_lr = RECOVERY_LR if recover_lr is None else recover_lr
    if mlp_global is not None:
        scope = f"mlpglobal{mlp_global:g}"
    else:
        scope = "mlp" if (mlp_only or tool == "torch-pruning") else f"global-{heads}"
    return (f"{tool}-{importance}-{scope}-{ratio:g}" + ("-lsq" if reconstruct else "")
            + (f"-damp{damping:g}" if damping is not None else "")
            + (f"-recover{recover:g}" if recover else "") + (f"-{recover_mode}" if recover_mode != "distill" else "")
            + (f"-lr{recover_lr:g}" if recover_lr != RECOVERY_LR else "")
            + (f"-only-{train_only.replace('.', '').replace('+', '-')}" if train_only else ""))


def best_name(ratio: float, recover: float = 0.0, importance: str = BEST) -> str:
    return prune_name("prunekit", importance, ratio, False, "kv", recover, BEST_FLOOR, reconstruct=True,
                      recover_lr=BEST_RECOVERY_LR if recover else None, recover_mode=BEST_RECOVERY_MODE if recover else "distill")


def depth_name(blocks: int, criterion: str) -> str:
    return f"depth-{criterion}-{blocks}"


def equal_name(blocks: int, importance: str = BEST) -> str:
    return f"width-equal-depth-{blocks}-{importance}"


def plan() -> list[tuple[str, list[str]]]:
    """(result name, phase arguments) of every run, in the order ``all`` runs them."""
    runs: list[tuple[str, list[str]]] = [("dense", ["dense"])]
    for ratio in RATIOS:
        for importance in TORCH_PRUNING:
            runs.append((prune_name("torch-pruning", importance, ratio, True),
                         ["prune", "--tool", "torch-pruning", "--importance", importance, "--ratio", f"{ratio:g}"]))
        for importance in ("l2", "taylor"):
            runs.append((prune_name("prunekit", importance, ratio, True),
                         ["prune", "--tool", "prunekit", "--importance", importance, "--ratio", f"{ratio:g}",
                          "--mlp-only"]))
        for importance in (BEST, PREVIOUS_BEST):
            for recover in (0.0, RECOVERY_SECONDS):
                runs.append((best_name(ratio, recover, importance),
                             ["prune", "--tool", "prunekit", "--importance", importance, "--ratio", f"{ratio:g}",
                              "--mlp-global", f"{BEST_FLOOR:g}", "--reconstruct"]
                             + (["--recover", f"{recover:g}", "--recover-mode", BEST_RECOVERY_MODE,
                                 "--recover-lr", f"{BEST_RECOVERY_LR:g}"] if recover else [])))
    # Measured alternatives at 20 %: recoveries training only the MLPs and norms (fewer weight gradients,
    # more steps in the budget), Taylor without reconstruction, and FLAP.
    for importance, rates in RECOVERY_TRAIN_ONLY_LRS.items():
        for lr in rates:
            runs.append((prune_name("prunekit", importance, 0.2, False, "kv", RECOVERY_SECONDS, BEST_FLOOR, True, lr,
                                    BEST_RECOVERY_MODE, train_only=RECOVERY_TRAIN_ONLY),
                         ["prune", "--tool", "prunekit", "--importance", importance, "--ratio", "0.2", "--mlp-global",
                          f"{BEST_FLOOR:g}", "--reconstruct", "--recover", f"{RECOVERY_SECONDS:g}", "--recover-mode",
                          BEST_RECOVERY_MODE, "--recover-lr", f"{lr:g}", "--recover-train-only", RECOVERY_TRAIN_ONLY]))
    for recover in (0.0, RECOVERY_SECONDS):
        runs.append((prune_name("prunekit", "taylor", 0.2, False, "kv", recover, BEST_FLOOR),
                     ["prune", "--tool", "prunekit", "--importance", "taylor", "--ratio", "0.2",
                      "--mlp-global", f"{BEST_FLOOR:g}"] + (["--recover", f"{recover:g}"] if recover else [])))
    for recover in (0.0, RECOVERY_SECONDS):
        runs.append((prune_name("prunekit", "flap", 0.2, False, "kv", recover),
                     ["prune", "--tool", "prunekit", "--importance", "flap", "--ratio", "0.2"]
                     + (["--recover", f"{recover:g}"] if recover else [])))
    # prunekit shrink's default for a causal LM: Fisher, MLP neurons and key/value groups ranked together
    runs.append((prune_name("prunekit", "fisher", 0.2, False),
                 ["prune", "--tool", "prunekit", "--importance", "fisher", "--ratio", "0.2"]))
    runs.append((prune_name("prunekit", "flap", 0.2, False, mlp_global=BEST_FLOOR),
                 ["prune", "--tool", "prunekit", "--importance", "flap", "--ratio", "0.2", "--mlp-global",
                  f"{BEST_FLOOR:g}"]))
    for criterion in ("influence", "perplexity"):
        runs.append((depth_name(DEPTH_BLOCKS, criterion),
                     ["depth", "--blocks", str(DEPTH_BLOCKS), "--criterion", criterion]))
    for importance in (BEST, PREVIOUS_BEST):
        runs.append((equal_name(DEPTH_BLOCKS, importance),
                     ["equal", "--blocks", str(DEPTH_BLOCKS), "--importance", importance]))
    return runs


# ---- measuring -------------------------------------------------------------------------------

def _load():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lm = load_model()
    return lm, calibration_windows(lm.tokenizer, PROTOCOL), test_windows(lm.tokenizer, PROTOCOL)


def _measure(model, test, side_by_side: bool = True) -> dict:
    """Parameters, perplexity and speed; a pruned model is timed side by side with a fresh unpruned copy
    (loaded here, after pruning, so that it adds nothing to the pruning's peak memory)."""
    result = {"parameters": count_parameters(model), "perplexity": perplexity(model, test).perplexity}
    make = lm_inputs(SPEED.seq_len, model.get_input_embeddings().num_embeddings)
    if not side_by_side:
        result["speed"] = measure(model, make, SPEED.seq_len, SPEED, unit="tokens").to_dict()
        return result
    speeds = measure_side_by_side({"dense": load(), "pruned": model}, make, SPEED.seq_len, SPEED,
                                  unit="tokens")
    result["speed"] = speeds["pruned"].to_dict()
    result["speed_dense_side_by_side"] = speeds["dense"].to_dict()
    return result


def _dense_speed(run: dict, dense_run: dict) -> tuple[dict, bool]:
    """The dense throughput to divide by: the one timed beside this run when there is one (runs before
    side-by-side timing have none: then the dense run's own, timed in another process)."""
    paired = run.get("speed_dense_side_by_side")
    return (paired or dense_run["speed"])["throughput"], paired is not None


def _write(name: str, result: dict) -> None:
    result["environment"] = environment()
    RAW.mkdir(parents=True, exist_ok=True)
    write_json(RAW / f"{name}.json", result)
    print(json.dumps({k: result[k] for k in ("name", "parameters", "perplexity") if k in result}
                     | ({"perplexity_recovered": result["perplexity_recovered"]} if "perplexity_recovered" in result else {})))


def dense() -> None:
    lm, _, test = _load()
    _write("dense", {"name": "dense", **_measure(lm.model, test, side_by_side=False), "protocol": PROTOCOL.describe(),
                     "speed_protocol": SPEED.describe()})


# ---- pruning ---------------------------------------------------------------------------------

def _neurons_for(model, ratio: float) -> int:
    """MLP neurons removed from every layer so that at least ``ratio`` of all parameters go (MLP only)."""
    layers = model.model.layers
    per_neuron = 3 * model.config.hidden_size
    return math.ceil(ratio * count_parameters(model) / (len(layers) * per_neuron))


def _torch_pruning(model, importance: str, ratio: float, calibration: torch.Tensor) -> dict:
    import torch_pruning as tp

    criteria = {"l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                "taylor": lambda: tp.importance.GroupTaylorImportance(),
                "hessian": lambda: tp.importance.GroupHessianImportance()}
    if importance not in criteria:
        raise SystemExit(f"the Torch-Pruning runs support {sorted(criteria)}, not {importance}")
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
    # Torch-Pruning keeps int(width × (1 − ratio)) channels: half a neuron below the count lands on it exactly.
    pruner = tp.pruner.MetaPruner(model, example, importance=criterion, global_pruning=False,
                                  pruning_ratio=(neurons - 0.5) / width, ignored_layers=ignored)
    if importance in ("taylor", "hessian"):
        model.zero_grad()
        for index in range(calibration.shape[0]):
            window = calibration[index:index + 1]
            loss = model(input_ids=window, labels=window).loss
            loss.backward()
            if importance == "hessian":  # its estimate needs one gradient per sample
                criterion.accumulate_grad(model)
                model.zero_grad(set_to_none=False)  # it writes its estimate into .grad, which must exist
    pruner.step()
    model.zero_grad()
    for layer in model.model.layers:
        layer.mlp.intermediate_size = layer.mlp.down_proj.in_features
    model.config.intermediate_size = model.model.layers[0].mlp.down_proj.in_features
    return {"neurons_removed_per_layer": neurons, "kept": model.config.intermediate_size}


def _prunekit(model, importance: str, ratio: float, calibration: torch.Tensor, mlp_only: bool, heads: str,
              mlp_global: float | None = None, reconstruct: bool = False, damping: float | None = None) -> dict:
    if mlp_global is not None:
        settings = {"granularity": "channels", "allocation": {"name": "global", "round_to": 8, "floor": mlp_global}}
    elif mlp_only:
        settings = {"granularity": "channels", "allocation": {"name": "uniform", "round_to": 1, "floor": 0.0}}
    else:
        settings = {"granularity": "channels,heads", "allocation": {"name": "global", "round_to": 8, "floor": 0.1},
                    "head_mode": heads}
    result = prune_structure(model, ratio, example_inputs=lm_example_inputs(), importance=importance,
                             calibration=lm_calibration(calibration), reconstruct=reconstruct,
                             **({"damping": damping} if damping is not None else {}), **settings)
    return {"plan": result.plan.to_dict(), "seconds": result.seconds, "notes": result.notes,
            "allocation": result.allocation}


def _recover(lm, teacher, seconds: float, lr: float, mode: str, train_only: str = "") -> dict:
    text = tokenize(lm.tokenizer, source_text(PROTOCOL.calibration, "calibration", PROTOCOL))
    train = random_windows(text, RECOVERY_SAMPLES, PROTOCOL.seq_len, PROTOCOL.seed + 1)
    return recover_lm(lm.model, train, teacher=teacher, objective=mode, seconds=seconds, lr=lr, batch_size=1,
                      train_only=tuple(train_only.split("+")) if train_only else ()).to_dict()


def prune(tool: str, importance: str, ratio: float, mlp_only: bool, heads: str, recover: float,
          name: str | None = None, scope: str | None = None, mlp_global: float | None = None,
          reconstruct: bool = False, recover_lr: float = 0.0, recover_mode: str = "distill",
          damping: float | None = None, train_only: str = "") -> None:
    recover_lr = recover_lr or RECOVERY_LR
    lm, calibration, test = _load()
    teacher = copy.deepcopy(lm.model) if (recover and recover_mode == "distill") else None
    with Measured() as pruning:
        details = (_torch_pruning(lm.model, importance, ratio, calibration) if tool == "torch-pruning"
                   else _prunekit(lm.model, importance, ratio, calibration, mlp_only, heads, mlp_global, reconstruct,
                                  damping))
    local = mlp_only or tool == "torch-pruning"
    default_scope = ("MLP neurons, uniform" if local else f"MLP neurons + heads ({heads}), global")
    if mlp_global is not None:
        default_scope = f"MLP neurons, global (floor {mlp_global:g})"
    if reconstruct:
        default_scope += ", least-squares reconstruction" + (f" (damping {damping:g})" if damping is not None else "")
    if recover and recover_mode != "distill":
        default_scope += f", recovery by the {recover_mode} LM loss"
    if recover and recover_lr != RECOVERY_LR:
        default_scope += f", recovery lr {recover_lr:g}"
    if recover and train_only:
        default_scope += f", recovery trains only {train_only}"
    result = {"name": name or prune_name(tool, importance, ratio, mlp_only, heads, recover, mlp_global, reconstruct,
                                         recover_lr, recover_mode, damping, train_only),
              "tool": tool,
              "importance": importance, "ratio": ratio, "scope": scope or default_scope,
              "prune_seconds": pruning.seconds, "prune_peak_rss": pruning.peak_rss, "details": details,
              **_measure(lm.model, test)}
    if recover:
        result["recovery"] = _recover(lm, teacher, recover, recover_lr, recover_mode, train_only)
        del teacher
        result["perplexity_recovered"] = perplexity(lm.model, test).perplexity
    _write(result["name"], result)


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
    _write(depth_name(blocks, criterion),
           {"name": depth_name(blocks, criterion), "tool": "prunekit", "importance": f"depth ({criterion})",
            "ratio": None, "scope": f"{blocks} of {result_depth.blocks_before} blocks",
            "prune_seconds": pruning.seconds, "details": result_depth.to_dict(), **_measure(lm.model, test)})


def blocks_fraction(model, blocks: int) -> float:
    """The fraction of all parameters that ``blocks`` decoder blocks hold (SmolLM2's blocks are equal)."""
    sizes = {count_parameters(block) for block in model.model.layers}
    if len(sizes) != 1:
        raise SystemExit(f"blocks differ in size ({sorted(sizes)}); the equal-parameter run needs the depth result")
    return blocks * sizes.pop() / count_parameters(model)


def equal(blocks: int, importance: str = BEST) -> None:
    """prunekit's best width pruning at the parameter fraction that ``blocks`` whole blocks hold."""
    model = load()
    ratio = blocks_fraction(model, blocks)
    del model
    prune("prunekit", importance, ratio, False, "kv", 0.0, name=equal_name(blocks, importance), mlp_global=BEST_FLOOR,
          reconstruct=True,
          scope=f"MLP neurons, global (floor {BEST_FLOOR:g}), least-squares reconstruction, as many parameters as "
                f"{blocks} blocks")


# ---- the report ------------------------------------------------------------------------------

def _row(run: dict, dense_run: dict) -> tuple:
    base_params, base_ppl = dense_run["parameters"], dense_run["perplexity"]
    base_speed, paired = _dense_speed(run, dense_run)
    mark = "" if paired else " †"
    speed = run["speed"]["throughput"]
    recovered = run.get("perplexity_recovered")
    return (run["tool"], run["importance"], run["scope"], f"{run['parameters']:,}",
            f"{1 - run['parameters'] / base_params:.1%}", f"{run['perplexity']:,.2f}",
            f"{run['perplexity'] / base_ppl:,.2f}×",
            f"{recovered:.2f} ({recovered / base_ppl:.2f}×, {run['recovery']['seconds']:.0f} s)" if recovered else "–",
            f"{speed['1']:.0f}", f"{speed['8']:.0f}", f"{speed['1'] / base_speed['1']:.2f}×{mark}",
            f"{speed['8'] / base_speed['8']:.2f}×{mark}", f"{run['prune_seconds']:.0f}")


def _checks(runs: dict[str, dict], dense_run: dict) -> list[tuple[str, str, str]]:
    """(target, PASS/MISS/NOT RUN, the figures) for every target of the issue."""
    base_ppl = dense_run["perplexity"]
    checks = []
    for ratio in RATIOS:
        plain = runs.get(best_name(ratio))
        # The best recovery of prunekit's best setting, whatever its learning rate (rows name theirs).
        prefix = f"{best_name(ratio)}-recover{RECOVERY_SECONDS:g}"  # any loss, learning rate or trained part
        candidates = [run for name, run in runs.items() if name.startswith(prefix)]
        recovered = min(candidates, key=lambda run: run["perplexity_recovered"]) if candidates else None
        label = f"{ratio:.0%} removed"
        if ratio == 0.2:
            limit = TARGETS["perplexity_no_recovery"]
            if plain:
                factor = plain["perplexity"] / base_ppl
                checks.append((f"{label}: perplexity ≤ {limit:g}× dense without recovery",
                               "PASS" if factor <= limit else "MISS",
                               f"{plain['perplexity']:.2f} = {factor:.2f}× dense {base_ppl:.2f}"))
            else:
                checks.append((f"{label}: perplexity ≤ {limit:g}× dense without recovery", "NOT RUN", "–"))
            limit = TARGETS["perplexity_recovered"]
            if recovered:
                factor = recovered["perplexity_recovered"] / base_ppl
                seconds = recovered["recovery"]["seconds"]
                ok = factor <= limit and seconds <= RECOVERY_SECONDS
                checks.append((f"{label}: perplexity ≤ {limit:g}× dense after ≤ {RECOVERY_SECONDS:.0f} s of recovery",
                               "PASS" if ok else "MISS",
                               f"{recovered['perplexity_recovered']:.2f} = {factor:.2f}× dense after {seconds:.0f} s"))
            else:
                checks.append((f"{label}: perplexity ≤ {limit:g}× dense after recovery", "NOT RUN", "–"))
        else:
            figures = [f"{run['perplexity']:.2f} without recovery" for run in (plain,) if run]
            figures += [f"{run['perplexity_recovered']:.2f} after {run['recovery']['seconds']:.0f} s of recovery"
                        for run in (recovered,) if run]
            checks.append((f"{label}: perplexity before and after recovery (reported)", "REPORTED" if figures else "NOT RUN",
                           "; ".join(figures) + f" (dense {base_ppl:.2f})" if figures else "–"))
        limit = TARGETS["speedup_b8"][ratio]
        if plain:
            base_speed, paired = _dense_speed(plain, dense_run)
            speedup = plain["speed"]["throughput"]["8"] / base_speed["8"]
            checks.append((f"{label}: throughput at batch 8 ≥ {limit:g}× dense", "PASS" if speedup >= limit else "MISS",
                           f"{plain['speed']['throughput']['8']:.0f} vs {base_speed['8']:.0f} tokens/s = {speedup:.2f}×"
                           + (" (side by side)" if paired else " (dense timed apart)")))
        else:
            checks.append((f"{label}: throughput at batch 8 ≥ {limit:g}× dense", "NOT RUN", "–"))
    return checks


def report() -> None:
    dense_run = json.loads((RAW / "dense.json").read_text())
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(RAW.glob("*.json")) if path.stem != "dense"}
    base_params, base_speed = dense_run["parameters"], dense_run["speed"]["throughput"]
    headers = ["tool", "importance", "what is removed", "parameters", "removed", "perplexity", "vs dense",
               "after recovery", "tok/s b1", "tok/s b8", "speedup b1", "speedup b8", "prune s"]
    dense_row = ("dense", "–", "–", f"{base_params:,}", "0 %", f"{dense_run['perplexity']:.2f}", "1.00×", "–",
                 f"{base_speed['1']:.0f}", f"{base_speed['8']:.0f}", "1.00×", "1.00×", "–")
    order = {name: index for index, (name, _) in enumerate(plan())}
    width_runs = [run for name, run in runs.items() if run.get("ratio") in RATIOS]
    width_runs.sort(key=lambda r: (r["ratio"], order.get(r["name"], 10**6), r["name"]))
    width_table = markdown_table(headers, [dense_row] + [_row(run, dense_run) for run in width_runs])
    depth_runs = [runs[name] for name in (depth_name(DEPTH_BLOCKS, "influence"), depth_name(DEPTH_BLOCKS, "perplexity"),
                                          equal_name(DEPTH_BLOCKS), equal_name(DEPTH_BLOCKS, PREVIOUS_BEST))
                  if name in runs]
    depth_table = markdown_table(headers, [dense_row] + [_row(run, dense_run) for run in depth_runs])
    checks = _checks(runs, dense_run)
    check_table = markdown_table(["target", "result", "measured"], checks)
    missing = [name for name, _ in plan() if name != "dense" and name not in runs]
    text = (f"# SmolLM2-135M structural pruning\n\n## Width: 20 % and 40 % of the parameters\n\n{width_table}\n\n"
            f"## Depth ({DEPTH_BLOCKS} of 30 blocks) against width at equal parameters\n\n{depth_table}\n\n"
            f"## Targets\n\n{check_table}\n\n"
            f"Perplexity: {PROTOCOL.summary()}.\n\nSpeed: {SPEED.describe()}; each pruned model timed side by "
            f"side with a fresh unpruned copy, their passes alternating, and its speed-ups are against that copy; "
            f"† marks runs made before side-by-side timing, divided by the dense run's own timing (another "
            f"process).\n\n"
            f"Recovery: on {RECOVERY_SAMPLES} calibration-split windows of {PROTOCOL.seq_len} tokens, batch 1, "
            f"at most {RECOVERY_SECONDS:.0f} s; distillation from the unpruned model at lr {RECOVERY_LR:g} unless "
            f"the row says otherwise (prunekit's best rows: the {BEST_RECOVERY_MODE} LM loss at lr "
            f"{BEST_RECOVERY_LR:g}).\n"
            + (f"\nNot run yet: {', '.join(missing)}.\n" if missing else ""))
    write_json(ROOT / "structure_smollm2.json", {"dense": dense_run, "runs": list(runs.values()), "checks": checks,
                                                 "protocol": PROTOCOL.describe(), "speed_protocol": SPEED.describe()})
    (ROOT / "structure_smollm2.md").write_text(text)
    print(text)
    for target, verdict, figures in checks:
        print(f"{verdict:8} {target}: {figures}")


# ---- running everything ----------------------------------------------------------------------

def _command(arguments: list[str], lock: str | None) -> list[str]:
    return phase_command(__file__, arguments, lock)


def run_all(lock: str | None) -> None:
    """Every run in order, each in a fresh process, skipping those whose result file exists; then the report."""
    run_phases(__file__, plan(), RAW, lock, report, needs_torch_pruning=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    sub.add_parser("dense", help="the unpruned model")
    prune_parser = sub.add_parser("prune", help="one width-pruning run")
    prune_parser.add_argument("--tool", choices=["prunekit", "torch-pruning"], required=True)
    prune_parser.add_argument("--importance", required=True)
    prune_parser.add_argument("--ratio", type=float, required=True)
    prune_parser.add_argument("--mlp-only", action="store_true", help="prunekit: MLP neurons only, uniform")
    prune_parser.add_argument("--heads", choices=["kv", "query"], default="kv")
    prune_parser.add_argument("--mlp-global", type=float, metavar="FLOOR",
                              help="prunekit: MLP neurons only, ranked across layers, each layer keeping FLOOR")
    prune_parser.add_argument("--recover", type=float, default=0.0, help="seconds of distillation after pruning")
    prune_parser.add_argument("--recover-lr", type=float, default=0.0, help=f"recovery learning rate [{RECOVERY_LR:g}]")
    prune_parser.add_argument("--recover-mode", choices=["distill", "plain"], default="distill",
                              help="recovery loss: distillation from the unpruned model, or the plain LM loss")
    prune_parser.add_argument("--reconstruct", action="store_true",
                              help="prunekit: refit the layers reading removed neurons by least squares")
    prune_parser.add_argument("--recover-train-only", default="", metavar="PARTS",
                              help="train only parameters whose names contain one of these '+'-joined fragments")
    prune_parser.add_argument("--damping", type=float, help="reconstruction damping [the library's default]")
    depth_parser = sub.add_parser("depth", help="remove whole blocks")
    depth_parser.add_argument("--blocks", type=int, default=DEPTH_BLOCKS)
    depth_parser.add_argument("--criterion", choices=["influence", "perplexity"], default="influence")
    equal_parser = sub.add_parser("equal", help="width pruning at the parameters of --blocks blocks")
    equal_parser.add_argument("--blocks", type=int, default=DEPTH_BLOCKS)
    equal_parser.add_argument("--importance", default=BEST)
    sub.add_parser("report", help="the tables and the targets, from the result files")
    sub.add_parser("plan", help="list every run of 'all' with its command and whether its result exists")
    all_parser = sub.add_parser("all", help="every run in order (resumable), then the report")
    all_parser.add_argument("--lock", help="run each phase under 'flock LOCK' (e.g. /tmp/prunekit-cpu.lock)")
    args = parser.parse_args(argv)
    if args.phase == "dense":
        dense()
    elif args.phase == "prune":
        prune(args.tool, args.importance, args.ratio, args.mlp_only, args.heads, args.recover,
              mlp_global=args.mlp_global, reconstruct=args.reconstruct, recover_lr=args.recover_lr,
              recover_mode=args.recover_mode, damping=args.damping, train_only=args.recover_train_only)
    elif args.phase == "depth":
        depth(args.blocks, args.criterion)
    elif args.phase == "equal":
        equal(args.blocks, args.importance)
    elif args.phase == "plan":
        print_plan(__file__, plan(), RAW)
    elif args.phase == "all":
        run_all(args.lock)
    else:
        report()


if __name__ == "__main__":
    main(sys.argv[1:])
