"""Which structural criterion should classifiers use? Measured on four CNNs of different shapes.

Each CNN is trained on Fashion-MNIST (seeded, cached), then for every criterion of
``prunekit.structure.importance``: calibrate on 1,024 shuffled training images, remove half of the
MACs of one image with global allocation, measure test accuracy before recovery and after one epoch
of recovery, the parameters and MACs left, and the pruning time. A diagnosis phase per CNN measures
why a criterion fails: each unit's real loss increase when removed alone, against each criterion's
score (within a layer, and pooled across layers as the global ranking uses them), Fisher with
per-example and per-batch gradients, and which layers each criterion empties.

    python benchmarks/structure_cnn_defaults.py all --lock /tmp/prunekit-cpu.lock   # resumable
    python benchmarks/structure_cnn_defaults.py plan                                # what is done

Every phase is a fresh process (under the lock with ``--lock``) writing one JSON file to the cache
(``$PRUNEKIT_CACHE/bench/structure_cnn_defaults``, by default ``~/.cache/prunekit/...``): trained
weights and raw results survive between runs, and a phase whose file exists is skipped. The report
goes to ``benchmarks/results/structure_cnn_defaults.{json,md}``.

Protocol: SGD + Nesterov, lr 0.05, cosine, batch 128, weight decay 5e-4, seed 0, the full 60 k training
images, ``EPOCHS`` epochs; accuracy on the full 10 k test images. Calibration: the first 1,024 of a
seeded permutation of the training images, batches of 128. Pruning: ``prune_structure(ratio=0.5,
target="macs", allocation=global, floor 0.1, widths multiples of 8)``, channels granularity. Recovery:
one epoch of plain cross-entropy at lr 0.01, cosine (``recover_classifier``), seed 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from phases import print_plan, run_phases  # noqa: E402
from prunekit.core.cache import cache_dir  # noqa: E402
from prunekit.evaluate.accuracy import accuracy  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.models.fashion_mnist import load_fashion_mnist  # noqa: E402
from prunekit.models.vision import InceptionNet, MobileNetSE, VGGNet  # noqa: E402
from prunekit.structure import classifier_calibration, prune_structure  # noqa: E402
from prunekit.structure.measure import count_macs, count_parameters  # noqa: E402
try:  # where the recovery moved with the job shape; before, in prunekit.structure
    from prunekit.training.recovery import recover_classifier  # noqa: E402
except ImportError:
    from prunekit.structure.recovery import recover_classifier  # noqa: E402
from prunekit.structure.zoo import ResNetLike  # noqa: E402
from prunekit.training.loop import train_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results"
RAW = cache_dir("bench", "structure_cnn_defaults")
EPOCHS = 4
TRAIN_LR = 0.05
CALIBRATION = 1024
CALIBRATION_BATCH = 128
RATIO = 0.5
ALLOCATION = {"name": "global", "floor": 0.1, "round_to": 8}
RECOVERY_EPOCHS = 1
RECOVERY_LR = 0.01
SEED = 0

# name -> (constructor, shape in words)
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet": (lambda: ResNetLike(widths=(16, 32, 64), blocks=(2, 2, 2)), "residual (basic blocks, 1×1 shortcuts)"),
    "vgg": (VGGNet, "plain (3×3 convolutions, max-pools, flatten into a two-layer classifier)"),
    "mobilenet": (MobileNetSE, "depthwise-separable inverted residuals with squeeze-excitation"),
    "inception": (InceptionNet, "concatenated branches, one with a grouped 3×3 convolution"),
}
CRITERIA = ("fisher", "taylor", "l2", "l1", "wanda", "flap", "random")
# The main runs: each criterion with its default normalisation, and Fisher also ranked on its raw scores
# (``normalize: none``, its default before this benchmark: the collapse the issue reported).
RUNS = (("fisher", None), ("fisher", "none"), ("taylor", None), ("l2", None), ("l1", None), ("wanda", None),
        ("flap", None), ("random", None))


def run_name(name: str, criterion: str, normalize: str | None) -> str:
    return f"{name}-{criterion}" + (f"-{normalize}" if normalize else "")


def run_label(criterion: str, normalize: str | None) -> str:
    return criterion + (f" (normalize {normalize})" if normalize else "")


def build(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    return MODELS[name][0]()


def _data():
    return load_fashion_mnist("train"), load_fashion_mnist("test")


def calibration_indices(count: int = CALIBRATION) -> torch.Tensor:
    """The first ``count`` of a seeded permutation of the 60 k training images."""
    return torch.randperm(60_000, generator=torch.Generator().manual_seed(SEED))[:count]


def dense_model(name: str) -> nn.Module:
    path = RAW / f"{name}-dense.pt"
    if not path.exists():
        raise SystemExit(f"no trained {name} in {RAW}; run: python {Path(__file__).name} train --model {name}")
    model = build(name)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def train(name: str, epochs: int) -> None:
    torch.set_num_threads(2)
    train_set, test_set = _data()
    model = build(name)
    started = time.perf_counter()
    history = train_classifier(model, train_set.images, train_set.labels, epochs=epochs, lr=TRAIN_LR, seed=SEED,
                               description=f"Training {name}")
    seconds = time.perf_counter() - started
    torch.save(model.state_dict(), RAW / f"{name}-dense.pt")
    example = (test_set.images[:1],)
    result = {"model": name, "shape": MODELS[name][1], "epochs": epochs, "train_seconds": seconds,
              "losses": history.losses, "accuracy": accuracy(model, test_set.images, test_set.labels),
              "train_accuracy": accuracy(model, train_set.images, train_set.labels),
              "parameters": count_parameters(model), "macs": count_macs(model.eval(), example),
              "environment": environment()}
    write_json(RAW / f"{name}-dense.json", result)  # written last: its presence marks the phase done
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "losses")}, indent=1))


def prune(name: str, importance: str | dict, images: torch.Tensor, labels: torch.Tensor,
          allocation: dict | None = None) -> tuple[nn.Module, dict]:
    """A pruned copy of the trained model and what the pruning did."""
    model = copy.deepcopy(dense_model(name))
    started = time.perf_counter()
    result = prune_structure(model, RATIO, example_inputs=(images[:1],), importance=importance, target="macs",
                             granularity="channels", allocation=allocation or ALLOCATION,
                             calibration=classifier_calibration(images, labels, CALIBRATION_BATCH), seed=SEED)
    seconds = time.perf_counter() - started
    return model.eval(), {"prune_seconds": seconds, "timings": result.seconds, "plan": result.plan.to_dict(),
                          "allocation": result.allocation, "importance": result.importance, "notes": result.notes}


def recalibrated_accuracy(model: nn.Module, images: torch.Tensor, test_images: torch.Tensor,
                          test_labels: torch.Tensor) -> float | None:
    """Test accuracy of a copy whose BatchNorm statistics are re-estimated on the calibration images (one
    pass in training mode, a cumulative average): removed channels change what every later BatchNorm sees,
    and its stored statistics then describe the unpruned model. None when the model has no BatchNorm."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches
    copied.train()
    with torch.no_grad():
        for start in range(0, images.shape[0], CALIBRATION_BATCH):
            copied(images[start:start + CALIBRATION_BATCH])
    return accuracy(copied.eval(), test_images, test_labels)


def shrink(name: str, importance: str, normalize: str | None = None) -> None:
    torch.set_num_threads(2)
    train_set, test_set = _data()
    chosen = calibration_indices()
    allocation = {**ALLOCATION, "normalize": normalize} if normalize else None
    model, details = prune(name, importance, train_set.images[chosen], train_set.labels[chosen], allocation)
    example = (test_set.images[:1],)
    pruned_accuracy = accuracy(model, test_set.images, test_set.labels)
    recalibrated = recalibrated_accuracy(model, train_set.images[chosen], test_set.images, test_set.labels)
    parameters, macs = count_parameters(model), count_macs(model, example)
    recovery = recover_classifier(model, train_set.images, train_set.labels, epochs=RECOVERY_EPOCHS, lr=RECOVERY_LR,
                                  seed=SEED)
    result = {"model": name, "importance": importance, "normalize_override": normalize, **details,
              "accuracy_pruned": pruned_accuracy, "accuracy_recalibrated": recalibrated,
              "accuracy_recovered": accuracy(model, test_set.images, test_set.labels),
              "parameters": parameters, "macs": macs, "recovery_seconds": recovery.seconds,
              "recovery_losses": recovery.losses, "environment": environment()}
    write_json(RAW / f"{run_name(name, importance, normalize)}.json", result)
    shown = ("accuracy_pruned", "accuracy_recalibrated", "accuracy_recovered", "parameters", "macs", "prune_seconds")
    print(json.dumps({key: result[key] for key in shown}, indent=1))


# ---- diagnosis: what each criterion's scores are worth, against each unit's real removal loss ----

ORACLE_UNITS = 24  # units per family whose removal is measured one at a time (all of a smaller family)


def _calibration_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        # summed in float64: one unit's effect can be small next to float32 rounding of a 1,024-term sum
        return float(sum(F.cross_entropy(model(images[i:i + 256]).double(), labels[i:i + 256], reduction="sum")
                         for i in range(0, images.shape[0], 256)) / images.shape[0])


def loss_increase_without(model: nn.Module, graph, family, units: list[int], images, labels, base: float) -> float:
    """The calibration loss increase with ``units`` of ``family`` zeroed (``zero_units``: the exact equivalent
    of removing them), the model restored afterwards."""
    from prunekit.structure.shrink import zero_units

    saved = {m.tensor: graph.tensor(m.tensor).detach().clone() for m in family.members}
    zero_units(graph, family, units)
    increase = _calibration_loss(model, images, labels) - base
    with torch.no_grad():
        for tensor, value in saved.items():
            graph.tensor(tensor).copy_(value)
    return increase


def removal_losses(model: nn.Module, graph, families, images, labels) -> dict[str, dict]:
    """For up to ``ORACLE_UNITS`` seeded units of every family: the calibration loss increase when that unit
    alone is removed, the rest of the model intact."""
    base = _calibration_loss(model, images, labels)
    generator = torch.Generator().manual_seed(SEED)
    result = {}
    for family in families:
        units = torch.randperm(family.size, generator=generator)[:ORACLE_UNITS].sort().values
        deltas = [loss_increase_without(model, graph, family, [unit], images, labels, base) for unit in units.tolist()]
        result[family.name] = {"units": units, "delta": torch.tensor(deltas, dtype=torch.float64)}
    return result


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float64)
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator else 0.0


class PerExample:
    """Fisher's accumulator, also keeping each calibration example's mask gradients (units × examples is
    small for these CNNs): how the Fisher mass spreads over examples, and the quadratic estimate of
    removing a whole set of units together, cross terms included."""

    def __init__(self, accumulator):
        self.accumulator = accumulator
        self.gradients: dict[str, list[torch.Tensor]] = {name: [] for name in accumulator.sums}

    def __call__(self, gradients) -> None:
        for name, mask_gradient in self.accumulator.mask_gradients(gradients).items():
            self.gradients[name].append(mask_gradient)
            self.accumulator.sums[name] += mask_gradient.square()
        self.accumulator.samples += 1

    def stacked(self) -> dict[str, torch.Tensor]:
        """family -> (examples, units) mask gradients."""
        return {name: torch.stack(values) for name, values in self.gradients.items()}


def quadratic_estimate(mask_gradients: dict[str, torch.Tensor], removal: dict[str, list[int]]) -> dict[str, float]:
    """The loss increase of removing every unit in ``removal`` together, by Fisher's quadratic model:
    ``diagonal`` = Σ over the units of ½ mean (∂L_s/∂m)² (what the ranking adds up), ``joint`` = ½ mean over
    examples of (Σ over the units of ∂L_s/∂m)² (the same model with the units' cross terms)."""
    examples = next(iter(mask_gradients.values())).shape[0]
    together = torch.zeros(examples, dtype=torch.float64)
    diagonal = 0.0
    for name, units in removal.items():
        chosen = mask_gradients[name][:, units]
        diagonal += float(chosen.square().mean(0).sum()) / 2
        together += chosen.sum(1)
    return {"diagonal": diagonal, "joint": float(together.square().mean()) / 2}


def fisher_variants(model: nn.Module, graph, families, images, labels) -> tuple[dict, dict]:
    """Fisher from one gradient per example (prunekit's) and from one per batch of 128 (the batch-mean
    loss); the per-example run also records how the Fisher mass spreads over the examples, and returns
    every example's mask gradients."""
    from prunekit.structure.importance.base import ScoringContext
    from prunekit.structure.importance.fisher import FisherAccumulator
    from prunekit.structure.statistics import accumulate_gradients

    calibration = classifier_calibration(images, labels, CALIBRATION_BATCH)
    context = ScoringContext(graph)
    per_example = PerExample(FisherAccumulator(list(families), context))
    accumulate_gradients(model, calibration.batches, calibration.loss_fn, per_example.accumulator.tensors,
                         calibration.targets, each_sample=per_example)
    per_batch = FisherAccumulator(list(families), context)
    for batch, target in zip(calibration.batches, calibration.targets):
        per_batch(accumulate_gradients(model, [batch], calibration.loss_fn, per_batch.tensors, [target]))
    scores = {"fisher": {k: v / 2 for k, v in per_example.accumulator.result().items()},
              "fisher (per batch)": {k: v / 2 for k, v in per_batch.result().items()}}
    with torch.no_grad():
        probabilities = torch.cat([model(images[i:i + 256]).softmax(-1) for i in range(0, images.shape[0], 256)])
    confidence = probabilities.gather(1, labels[:, None]).squeeze(1)
    stacked = per_example.stacked()
    shares = sum(values.square().sum(1) for values in stacked.values())
    shares = shares / shares.sum()
    top = torch.sort(shares, descending=True).values
    wrong = probabilities.argmax(-1) != labels
    saturation = {"examples": images.shape[0],
                  "share_correct_above_0.99": float(((confidence > 0.99) & ~wrong).double().mean()),
                  "share_misclassified": float(wrong.double().mean()),
                  "fisher_mass_top_1pct": float(top[:max(1, images.shape[0] // 100)].sum()),
                  "fisher_mass_top_10pct": float(top[:max(1, images.shape[0] // 10)].sum()),
                  "fisher_mass_misclassified": float(shares[wrong].sum())}
    return scores, saturation, stacked


# (scores, how families are compared, floor): "none"/"mean" rank every unit together (global allocation) on
# raw scores or on scores divided by their family's mean; "per MAC" ranks raw scores divided by the MACs one
# unit of the family costs (the loss per multiply-accumulate saved); "uniform" removes the same fraction of
# every family, each ranked by the scores. The floor is the smallest fraction of a family kept. Same target
# and rounding as the main runs; accuracy before recovery.
PRUNING_VARIANTS = (("fisher", "none", 0.1), ("fisher", "none", 0.3), ("fisher", "mean", 0.1), ("fisher", "per MAC", 0.1),
                    ("fisher", "uniform", 0.1), ("fisher (per batch)", "none", 0.1), ("taylor", "none", 0.1),
                    ("taylor", "mean", 0.1), ("taylor", "mean", 0.3), ("taylor", "uniform", 0.1), ("l2", "none", 0.1),
                    ("l2", "mean", 0.1), ("l2", "mean", 0.3), ("l2", "uniform", 0.1))


def prune_by_scores(model: nn.Module, graph, families, scores: dict[str, torch.Tensor], comparison: str,
                    floor: float, macs_per_unit: dict[str, int]):
    """A copy of ``model`` with half its MACs removed by ``scores``, families compared as ``comparison`` says."""
    import dataclasses

    from prunekit.structure.allocation import WidthAllocation, allocate
    from prunekit.structure.shrink import shrink as shrink_units

    pruned = copy.deepcopy(model)
    pruned_graph = dataclasses.replace(graph, model=pruned)
    settings = {**ALLOCATION, "floor": floor}
    if comparison == "uniform":
        strategy = WidthAllocation(**{**settings, "name": "uniform"})
    elif comparison == "per MAC":
        strategy = WidthAllocation(**{**settings, "normalize": "none"})
        scores = {name: values / macs_per_unit[name] for name, values in scores.items()}
    else:
        strategy = WidthAllocation(**{**settings, "normalize": comparison})
    plan = allocate(pruned_graph, families, scores, RATIO, "macs", strategy)
    shrink_units(pruned_graph, plan.removal)
    return pruned.eval(), plan


def diagnose(name: str) -> None:
    from prunekit.structure.graph import build_graph
    from prunekit.structure.importance import get_importance, normalize_scores
    from prunekit.structure.pipeline import score_families

    torch.set_num_threads(2)
    train_set, _ = _data()
    chosen = calibration_indices()
    images, labels = train_set.images[chosen], train_set.labels[chosen]
    model = dense_model(name)
    graph = build_graph(model, (images[:1],))
    families = graph.select(["channels"])
    by_name = {f.name: f for f in families}
    started = time.perf_counter()
    oracle = removal_losses(model, graph, families, images, labels)
    oracle_seconds = time.perf_counter() - started
    calibration = classifier_calibration(images, labels, CALIBRATION_BATCH)
    scores: dict[str, dict[str, torch.Tensor]] = {}
    defaults: dict[str, str] = {}
    for criterion in CRITERIA:
        if criterion in ("random", "fisher"):
            continue
        importance = get_importance(criterion)
        scores[criterion], _ = score_families(graph, families, importance, calibration, None, SEED)
        defaults[criterion] = importance.default_normalize
    fisher, saturation, mask_gradients = fisher_variants(model, graph, families, images, labels)
    scores.update(fisher)
    defaults.update({variant: get_importance("fisher").default_normalize for variant in fisher})
    costs = {f.name: {"macs_per_unit": (graph.mac_count() - graph.mac_count({f.name: 1})),
                      "parameters_per_unit": (graph.parameter_count() - graph.parameter_count({f.name: 1}))}
             for f in families}

    def sampled(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([values[f][oracle[f]["units"]] for f in oracle])

    truth = torch.cat([oracle[f]["delta"] for f in oracle])
    criteria = {}
    for criterion, values in scores.items():
        within = [spearman(values[f][oracle[f]["units"]], oracle[f]["delta"]) for f in oracle if oracle[f]["delta"].numel() > 2]
        pooled = {method: spearman(sampled(normalize_scores(values, by_name, method)), truth)
                  for method in ("none", "mean")}
        criteria[criterion] = {"default_normalize": defaults[criterion],
                               "spearman_within_family_mean": sum(within) / len(within),
                               "spearman_pooled": pooled}
    # Fisher claims to be the loss itself (ΔL ≈ ½F): how far off is it, family by family?
    per_family = {}
    for family in families:
        delta = oracle[family.name]["delta"]
        for variant in fisher:
            estimate = scores[variant][family.name][oracle[family.name]["units"]]
            per_family.setdefault(family.name, {})[f"{variant}: mean ½F"] = float(estimate.mean())
        per_family[family.name].update({"units": family.size, "mean removal loss": float(delta.mean()),
                                        "median removal loss": float(delta.median()), **costs[family.name]})
    _, test_set = _data()
    base_loss = _calibration_loss(model, images, labels)
    pruned = []
    macs_per_unit = {name: cost["macs_per_unit"] for name, cost in costs.items()}
    for variant, comparison, floor in PRUNING_VARIANTS:
        variant_model, variant_plan = prune_by_scores(model, graph, families, scores[variant], comparison, floor,
                                                      macs_per_unit)
        pruned.append({"scores": variant, "comparison": comparison, "floor": floor,
                       "widths": variant_plan.to_dict()["widths"],
                       "accuracy_pruned": accuracy(variant_model, test_set.images, test_set.labels),
                       "accuracy_recalibrated": recalibrated_accuracy(variant_model, images, test_set.images,
                                                                      test_set.labels),
                       "parameters": count_parameters(variant_model), "macs": count_macs(variant_model, (images[:1],)),
                       "calibration_loss_increase": _calibration_loss(variant_model, images, labels) - base_loss,
                       "fisher_estimate": quadratic_estimate(mask_gradients, variant_plan.removal)})
        if (variant, comparison, floor) == ("fisher", "none", ALLOCATION["floor"]):
            fisher_removal = variant_plan.removal
    # Fisher's own plan, one family at a time: the real loss of removing that family's chosen units together
    # against Fisher's estimates, without and with their cross terms.
    for family_name, units in fisher_removal.items():
        measured = loss_increase_without(model, graph, by_name[family_name], units, images, labels, base_loss)
        per_family[family_name]["fisher plan"] = {"removed": len(units), "loss increase": measured,
                                                  **quadratic_estimate(mask_gradients, {family_name: units})}
    result = {"model": name, "calibration_loss": base_loss,
              "oracle_units_per_family": ORACLE_UNITS, "oracle_seconds": oracle_seconds, "criteria": criteria,
              "families": per_family, "saturation": saturation, "pruned": pruned, "environment": environment()}
    write_json(RAW / f"{name}-diagnosis.json", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment",)}, indent=1))


# Pruning in steps, each scored anew on the model the previous step left: step i removes what brings the
# model to 1 − RATIO·i/STEPS of the dense MACs (so rounding in one step is made up in the next), with the main
# runs' allocation in every step (a floor compounded over the steps, floor^(1/STEPS) a step, would keep whole
# every 16-channel family: rounded to multiples of 8 it cannot lose a unit in any step).
STEPS = 4
STEP_RUNS = (("fisher", "none"), ("fisher", None), ("taylor", None), ("l2", None))  # (criterion, normalize)


def iterate(name: str) -> None:
    torch.set_num_threads(2)
    train_set, test_set = _data()
    chosen = calibration_indices()
    images, labels = train_set.images[chosen], train_set.labels[chosen]
    dense = dense_model(name)
    example = (images[:1],)
    dense_macs = count_macs(dense, example)
    results = []
    for criterion, normalize in STEP_RUNS:
        allocation = {**ALLOCATION, "normalize": normalize} if normalize else ALLOCATION
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        widths = []
        for step in range(1, STEPS + 1):
            ratio = 1 - dense_macs * (1 - RATIO * step / STEPS) / count_macs(model, example)
            if ratio <= 0:
                continue  # an earlier step's rounding already went past this step's target
            result = prune_structure(model, ratio, example_inputs=example, importance=criterion, target="macs",
                                     granularity="channels", allocation=allocation,
                                     calibration=classifier_calibration(images, labels, CALIBRATION_BATCH), seed=SEED)
            widths.append(_widths(result.plan.to_dict()["widths"]))
        seconds = time.perf_counter() - started
        macs = count_macs(model, example)
        results.append({"importance": criterion, "normalize": result.allocation["normalize"],
                        "label": run_label(criterion, normalize), "steps": len(widths), "widths": widths,
                        "accuracy_pruned": accuracy(model, test_set.images, test_set.labels),
                        "accuracy_recalibrated": recalibrated_accuracy(model, images, test_set.images, test_set.labels),
                        "parameters": count_parameters(model), "macs": macs, "macs_fraction": macs / dense_macs,
                        "prune_seconds": seconds})
    write_json(RAW / f"{name}-steps.json", {"model": name, "steps": STEPS, "allocation": ALLOCATION,
                                            "runs": results, "environment": environment()})
    print(json.dumps(results, indent=1))


def plan() -> list[tuple[str, list[str]]]:
    """(result name, phase arguments) of every run, in the order ``all`` runs them."""
    runs = []
    for name in MODELS:
        runs.append((f"{name}-dense", ["train", "--model", name, "--epochs", str(EPOCHS)]))
        runs += [(run_name(name, criterion, normalize),
                  ["shrink", "--model", name, "--importance", criterion] + (["--normalize", normalize] if normalize else []))
                 for criterion, normalize in RUNS]
        runs.append((f"{name}-diagnosis", ["diagnose", "--model", name]))
        runs.append((f"{name}-steps", ["iterate", "--model", name]))
    return runs


def _load(name: str) -> dict | None:
    path = RAW / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _points(value: float, reference: float) -> str:
    return f"{(value - reference) * 100:+.1f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _widths(widths: dict[str, list[int]]) -> str:
    return "/".join(str(kept) for _units, kept in widths.values())


def _main_tables(dense: dict, runs: dict, trained: list[str]) -> list[str]:
    rows = []
    for name in trained:
        reference = dense[name]["accuracy"]
        for criterion, normalize in RUNS:
            run = runs[(name, criterion, normalize)]
            if run is None:
                continue
            recalibrated = run.get("accuracy_recalibrated")
            rows.append((name, run_label(criterion, normalize), f"{run['accuracy_pruned']:.2%}", _points(run["accuracy_pruned"], reference),
                         f"{recalibrated:.2%}" if recalibrated is not None else "–",
                         f"{run['accuracy_recovered']:.2%}", _points(run["accuracy_recovered"], reference),
                         f"{run['parameters']:,}", f"{run['macs'] / dense[name]['macs']:.3f}",
                         f"{run['prune_seconds']:.1f}", _widths(run["plan"]["widths"])))
    sections = [f"## Every criterion on every CNN\n\nAccuracy right after pruning, after re-estimating the BatchNorm "
                f"statistics on the {CALIBRATION} calibration images (one forward pass, no training; measured on a copy), "
                f"and after {RECOVERY_EPOCHS} epoch of recovery (from the pruned model). Kept widths per family in "
                "graph order.\n\n" + markdown_table(
                    ["model", "criterion", "accuracy pruned", "Δ", "BN re-estimated", f"after {RECOVERY_EPOCHS} epoch",
                     "Δ", "parameters left", "MACs of dense", "prune s", "kept widths"], rows)]
    rows = []
    for criterion, normalize in RUNS:
        found = [(runs[(name, criterion, normalize)], dense[name]) for name in trained if runs[(name, criterion, normalize)]]
        if not found or len(found) < len(trained):
            continue
        before = [(run["accuracy_pruned"] - d["accuracy"]) * 100 for run, d in found]
        recalibrated = [(run["accuracy_recalibrated"] - d["accuracy"]) * 100 for run, d in found]
        after = [(run["accuracy_recovered"] - d["accuracy"]) * 100 for run, d in found]
        kept = [run["parameters"] / d["parameters"] for run, d in found]
        rows.append((run_label(criterion, normalize), f"{_mean(before):+.1f}", f"{_mean(recalibrated):+.1f}", f"{min(recalibrated):+.1f}",
                     f"{_mean(after):+.2f}", f"{min(after):+.2f}", f"{_mean(kept):.2f}"))
    if rows:
        sections.append(f"## Summary over the {len(trained)} CNNs\n\nMeans (and the worst CNN) of the Δ points against "
                        "each dense model.\n\n" + markdown_table(
                            ["criterion", "Δ pruned", "Δ BN re-estimated", "worst", f"Δ after {RECOVERY_EPOCHS} epoch",
                             "worst", "parameters kept (of dense)"], rows))
    return sections


def _diagnosis_section(name: str, diagnosis: dict, dense: dict) -> str:
    saturation = diagnosis["saturation"]
    text = [f"## Diagnosis: {name}\n\nCalibration loss {diagnosis['calibration_loss']:.4f}. Of the "
            f"{saturation['examples']} calibration images {saturation['share_correct_above_0.99']:.0%} are classified "
            f"correctly with probability > 0.99 and {saturation['share_misclassified']:.1%} wrongly. Fisher's mass (each "
            f"image's squared mask gradients summed over every unit): {saturation['fisher_mass_top_1pct']:.0%} from the "
            f"top 1 % of images, {saturation['fisher_mass_top_10pct']:.0%} from the top 10 %, "
            f"{saturation['fisher_mass_misclassified']:.0%} from the misclassified ones."]
    rows = [(criterion, f"{values['spearman_within_family_mean']:.2f}", f"{values['spearman_pooled']['none']:.2f}",
             f"{values['spearman_pooled']['mean']:.2f}") for criterion, values in diagnosis["criteria"].items()]
    text.append("Rank correlation (Spearman) of each criterion's scores with the real loss increase of removing each "
                f"unit alone ({diagnosis['oracle_units_per_family']} seeded units a family, all of smaller ones): within "
                "a family (mean over families), and pooled over all families as a global ranking sees them, raw and "
                "divided by each family's mean.\n\n" + markdown_table(
                    ["criterion", "within families", "pooled, raw", "pooled, ÷ family mean"],
                    rows))
    rows = []
    for family, info in diagnosis["families"].items():
        plan_ = info.get("fisher plan")
        rows.append((family, info["units"], f"{info['macs_per_unit']:,}", f"{info['parameters_per_unit']:,}",
                     f"{info['mean removal loss']:.4f}", f"{info['fisher: mean ½F']:.4f}",
                     f"{info['mean removal loss'] / max(info['fisher: mean ½F'], 1e-30):.1f}",
                     plan_["removed"] if plan_ else 0,
                     f"{plan_['loss increase']:.3f}" if plan_ else "–", f"{plan_['diagonal']:.3f}" if plan_ else "–",
                     f"{plan_['joint']:.3f}" if plan_ else "–"))
    text.append("Per family: the cost of one unit; the mean real loss increase of removing one unit alone against "
                "Fisher's estimate of it (½F); then Fisher's plan (raw global ranking), one family at a time: the units "
                "it removes there, the real loss increase of removing them together, and Fisher's estimates of it: "
                "the sum of their ½F (what the ranking assumes) and ½ mean (Σ ∂L/∂m)² (the same quadratic model with "
                "the units' cross terms).\n\n" + markdown_table(
                    ["family", "units", "MACs / unit", "params / unit", "loss, one unit", "½F, one unit", "ratio",
                     "Fisher removes", "real loss", "Σ ½F", "with cross terms"], rows))
    rows = [(variant["scores"], variant["comparison"], variant["floor"], f"{variant['accuracy_pruned']:.2%}",
             f"{variant['accuracy_recalibrated']:.2%}" if variant["accuracy_recalibrated"] is not None else "–",
             f"{variant['parameters']:,}", f"{variant['macs'] / dense['macs']:.3f}",
             f"{variant['calibration_loss_increase']:.2f}", f"{variant['fisher_estimate']['diagonal']:.2f}",
             _widths(variant["widths"]))
            for variant in diagnosis["pruned"]]
    text.append("The same scores under other ways of comparing families (none: raw scores ranked together; mean: each "
                "family divided by its mean; per MAC: raw scores divided by one unit's MACs, which is `normalize: cost` "
                "at a MAC target, Fisher's default since this benchmark; uniform: the same fraction of every family), "
                "half the MACs, no recovery:\n\n" + markdown_table(
                    ["scores", "families compared", "floor", "accuracy pruned", "BN re-estimated", "parameters left",
                     "MACs of dense", "real loss increase", "Σ ½F of the removed", "kept widths"], rows))
    return "\n\n".join(text)


# ---- the section of docs/structure.md: written from the result files, between two markers ----

DOCS = Path(__file__).resolve().parents[1] / "docs" / "structure.md"
DOCS_BEGIN = "<!-- begin: written by `python benchmarks/structure_cnn_defaults.py report --docs`; edit the script -->"
DOCS_END = "<!-- end: written by benchmarks/structure_cnn_defaults.py -->"
DOCS_BEFORE = "\n## Bad input"  # where the section goes the first time


def _signed(value: float, digits: int = 1) -> str:
    if abs(value) < 0.5 * 10 ** -digits:
        value = 0.0  # no "−0.0"
    return f"{value:+.{digits}f}".replace("-", "−")


def _wrap(text: str, width: int = 100) -> str:
    """Prose paragraphs wrapped as the rest of the docs are; tables, headings and markers left as they are."""
    import textwrap

    def paragraph(block: str) -> str:
        if block.startswith(("|", "#", "<!--")):
            return block
        return textwrap.fill(block, width, break_long_words=False, break_on_hyphens=False)

    return "\n\n".join(paragraph(block) for block in text.split("\n\n"))


def _percent(value: float) -> str:
    return f"{value * 100:.2f} %"


def _count(value: int) -> str:
    return f"{value:,}".replace(",", " ")


def _summary(dense: dict, runs: dict, trained: list[str], criterion: str, normalize: str | None) -> dict | None:
    """Means over the CNNs of one criterion's Δ points (pruned, BN re-estimated, recovered) and parameters kept;
    None unless it ran on every CNN."""
    found = [(runs[(name, criterion, normalize)], dense[name]) for name in trained]
    if not trained or any(run is None for run, _ in found):
        return None

    def points(key: str) -> list[float]:
        return [(run[key] - d["accuracy"]) * 100 for run, d in found]

    return {"pruned": _mean(points("accuracy_pruned")), "recalibrated": _mean(points("accuracy_recalibrated")),
            "recalibrated_worst": min(points("accuracy_recalibrated")), "recovered": _mean(points("accuracy_recovered")),
            "recovered_worst": min(points("accuracy_recovered")),
            "kept": _mean([run["parameters"] / d["parameters"] for run, d in found]),
            "seconds": _mean([run["prune_seconds"] for run, _ in found])}


def _worst_underestimate(diagnosis: dict) -> tuple[str, dict]:
    """The family of Fisher's raw-ranking plan whose removed units Fisher's additive estimate undervalues most."""
    planned = [(family, info["fisher plan"]) for family, info in diagnosis["families"].items()
               if info.get("fisher plan") and info["fisher plan"]["diagonal"] > 0]
    return max(planned, key=lambda item: item[1]["loss increase"] / item[1]["diagonal"])


def docs_section(dense: dict, runs: dict, diagnoses: dict, trained: list[str]) -> str:
    """The classifier criterion section of docs/structure.md, every figure read from the result files."""
    text = [f"### Structural criteria for classifiers: four CNNs (`benchmarks/structure_cnn_defaults.py`)\n\n"
            "Which criterion a classifier should be pruned with, measured on CNNs of different shapes. No pretrained "
            "CNN checkpoint is available offline here, so each CNN is trained on Fashion-MNIST instead "
            f"({EPOCHS} epochs, SGD with Nesterov momentum, lr {TRAIN_LR}, cosine, seed {SEED}; the weights are cached "
            "and reused): a substitute for pretrained models, small and narrow (16 to 256 channels a layer). "
            f"Each criterion: scores from {CALIBRATION} shuffled training images (seeded), {RATIO:.0%} of one image's "
            f"MACs removed as channels, global allocation (floor {ALLOCATION['floor']}, widths multiples of "
            f"{ALLOCATION['round_to']}), the criterion's default normalisation; then test accuracy (10 000 images) "
            "right after pruning, after re-estimating the BatchNorm statistics on the calibration images (one "
            f"forward pass on a copy, no training), and after {RECOVERY_EPOCHS} epoch of recovery (cross-entropy, lr "
            f"{RECOVERY_LR}). One run each, seed {SEED}; Δ in points against the dense model. Full tables, kept widths "
            "and the diagnosis of every family: `benchmarks/results/structure_cnn_defaults.md`."]
    rows = [(name, MODELS[name][1], _count(dense[name]["parameters"]), f"{dense[name]['macs'] / 1e6:.2f} M",
             _percent(dense[name]["accuracy"])) for name in trained]
    text.append(markdown_table(["CNN", "shape", "parameters", "MACs / image", "test accuracy"], rows))
    rows = []
    for name in trained:
        reference = dense[name]["accuracy"]
        for criterion, normalize in RUNS:
            run = runs[(name, criterion, normalize)]
            if run is None:
                continue
            label = {("fisher", "none"): "fisher, raw scores (old default)",
                     ("fisher", None): "fisher, loss per MAC (default)"}.get((criterion, normalize),
                                                                             run_label(criterion, normalize))
            rows.append((name, label, f"{_percent(run['accuracy_pruned'])} ({_signed((run['accuracy_pruned'] - reference) * 100)})",
                         _percent(run["accuracy_recalibrated"]) if run.get("accuracy_recalibrated") is not None else "–",
                         f"{_percent(run['accuracy_recovered'])} ({_signed((run['accuracy_recovered'] - reference) * 100)})",
                         _count(run["parameters"]), f"{run['macs'] / dense[name]['macs']:.3f}",
                         f"{run['prune_seconds']:.1f}"))
    fisher_seconds = [run["prune_seconds"] for (model, criterion, _), run in runs.items()
                      if model == trained[0] and criterion == "fisher" and run]
    text.append("Prune s is wall time on 2 CPU cores shared with other work, so it moves with the load"
                + (f" (the same Fisher scoring of {trained[0]} took {min(fisher_seconds):.0f} and "
                   f"{max(fisher_seconds):.0f} s in two runs)" if len(fisher_seconds) > 1 else "") + ".")
    text.append(markdown_table(["CNN", "criterion", "accuracy pruned (Δ)", "BN re-estimated",
                                f"after {RECOVERY_EPOCHS} epoch (Δ)", "parameters left", "MACs of dense", "prune s"],
                               rows))
    missing = [f"{name} {run_label(criterion, normalize)}" for name in trained for criterion, normalize in RUNS
               if runs[(name, criterion, normalize)] is None]
    if missing:
        text.append(f"Not measured (time): {', '.join(missing)}.")
    summaries = {(criterion, normalize): _summary(dense, runs, trained, criterion, normalize)
                 for criterion, normalize in RUNS}
    rows = [(run_label(criterion, normalize), _signed(s["pruned"]), _signed(s["recalibrated"]),
             _signed(s["recalibrated_worst"]), _signed(s["recovered"], 2), _signed(s["recovered_worst"], 2),
             f"{s['kept']:.2f}") for (criterion, normalize), s in summaries.items() if s]
    if rows:
        text.append(f"Means over the {len(trained)} CNNs (Δ points; worst CNN beside the mean):\n\n" + markdown_table(
            ["criterion", "Δ pruned", "Δ BN re-estimated", "worst", f"Δ after {RECOVERY_EPOCHS} epoch", "worst",
             "parameters kept (of dense)"], rows))
    diagnosed = [name for name in trained if diagnoses.get(name)]
    if diagnosed:
        text.append(_docs_diagnosis(dense, runs, diagnoses, diagnosed))
    text.append(_docs_decision(dense, runs, diagnoses, trained, summaries))
    return _wrap("\n\n".join(text))


def _docs_diagnosis(dense: dict, runs: dict, diagnoses: dict, diagnosed: list[str]) -> str:
    rows = []
    for name in diagnosed:
        criteria = diagnoses[name]["criteria"]
        others = {c: v for c, v in criteria.items() if not c.startswith("fisher")}
        best_within = max(others, key=lambda c: others[c]["spearman_within_family_mean"])
        best_pooled = max(others, key=lambda c: others[c]["spearman_pooled"]["none"])
        saturation = diagnoses[name]["saturation"]
        rows.append((name, f"{criteria['fisher']['spearman_within_family_mean']:.2f} / "
                           f"{criteria['fisher (per batch)']['spearman_within_family_mean']:.2f}",
                     f"{others[best_within]['spearman_within_family_mean']:.2f} ({best_within})",
                     f"{criteria['fisher']['spearman_pooled']['none']:.2f} / "
                     f"{criteria['fisher (per batch)']['spearman_pooled']['none']:.2f}",
                     f"{others[best_pooled]['spearman_pooled']['none']:.2f} ({best_pooled})",
                     f"{saturation['share_correct_above_0.99']:.0%}", f"{saturation['share_misclassified']:.1%}",
                     f"{saturation['fisher_mass_misclassified']:.0%}", f"{saturation['fisher_mass_top_10pct']:.0%}"))
    evidence = [
        "**Why Fisher ranked on raw scores failed.** The diagnosis (`diagnose` phase) removes "
        f"{diagnoses[diagnosed[0]]['oracle_units_per_family']} seeded units of every family one at a time (all of "
        "a smaller family) and measures the calibration loss each removal really costs, then compares every "
        "criterion's scores with it (Spearman rank correlation), within a family and pooled over all families as a "
        "global ranking sees them; Fisher from one gradient per image (prunekit's) and from one per batch of "
        f"{CALIBRATION_BATCH}; and how the calibration images share Fisher's mass (each image's squared mask "
        "gradients summed over every unit).\n\n" + markdown_table(
            ["CNN", "Fisher ρ within (per image / per batch)", "best other", "Fisher ρ pooled, raw (per image / "
             "per batch)", "best other", "images right at p > 0.99", "misclassified", "Fisher mass: misclassified",
             "top 10 % of images"], rows)]
    rows = []
    for name in diagnosed:
        raw, default = runs.get((name, "fisher", "none")), runs.get((name, "fisher", None))
        family, plan_ = _worst_underestimate(diagnoses[name])
        units = diagnoses[name]["families"][family]["units"]
        l2 = runs.get((name, "l2", None))
        rows.append((name, f"{_count(raw['parameters'])} / {_count(l2['parameters'])}" if raw and l2 else "–",
                     f"{family}: {plan_['removed']} of {units}", f"{plan_['loss increase']:.3f}",
                     f"{plan_['diagonal']:.3f}", f"{plan_['joint']:.3f}",
                     f"{_percent(raw['accuracy_recalibrated'])} → {_percent(default['accuracy_recalibrated'])}"
                     if raw and default else "–",
                     f"{_count(raw['parameters'])} → {_count(default['parameters'])}" if raw and default else "–"))
    evidence.append(
        "Fisher's plan ranked on raw scores (`normalize: none`, its default before this benchmark): the parameters it "
        "leaves against L2's at the same MAC target; the family whose removed units its additive estimate undervalues "
        "most (the real loss increase of removing them together, Σ ½F of them, which the ranking adds up, and the same "
        "quadratic model with the units' cross terms); then what ranking the loss per MAC (`normalize: cost`, its "
        "default now) changes:\n\n" + markdown_table(
            ["CNN", "parameters left: Fisher raw / L2", "worst-estimated family of the raw plan", "real loss",
             "Σ ½F", "with cross terms", "BN re-estimated: raw → per MAC", "parameters left: raw → per MAC"], rows))
    return "\n\n".join(evidence)


def _rank(runs: dict, name: str, key: str, criterion: str, normalize: str | None) -> tuple[int, int]:
    """(place, of how many) of one run among the main runs of one CNN by ``key`` (1 = highest)."""
    measured = [run for (model, c, z), run in runs.items() if model == name and run is not None and run.get(key) is not None]
    mine = runs[(name, criterion, normalize)]
    return 1 + sum(run[key] > mine[key] for run in measured), len(measured)


def _docs_decision(dense: dict, runs: dict, diagnoses: dict, trained: list[str], summaries: dict) -> str:
    """The decision, its comparisons computed from the runs."""
    with_fisher = [name for name in trained if runs[(name, "fisher", None)]]
    places = []
    for name in with_fisher:
        recovered, of = _rank(runs, name, "accuracy_recovered", "fisher", None)
        recalibrated, _ = _rank(runs, name, "accuracy_recalibrated", "fisher", None)
        pruned, _ = _rank(runs, name, "accuracy_pruned", "fisher", None)
        run, l2 = runs[(name, "fisher", None)], runs[(name, "l2", None)]
        places.append(f"{name} {_signed((run['accuracy_recovered'] - dense[name]['accuracy']) * 100, 2)} after "
                      f"{RECOVERY_EPOCHS} epoch (place {recovered} of {of}), BN re-estimated "
                      f"{_percent(run['accuracy_recalibrated'])} (place {recalibrated}), right after pruning "
                      f"{_percent(run['accuracy_pruned'])} (place {pruned}), {_count(run['parameters'])} parameters left"
                      + (f" (L2 {_count(l2['parameters'])})" if l2 else ""))
    changes = []
    for name in with_fisher:
        raw, cost = runs[(name, "fisher", "none")], runs[(name, "fisher", None)]
        if raw:
            changes.append(f"{name} {_percent(raw['accuracy_recalibrated'])} → {_percent(cost['accuracy_recalibrated'])} "
                           f"BN re-estimated, {_percent(raw['accuracy_recovered'])} → {_percent(cost['accuracy_recovered'])} "
                           f"after {RECOVERY_EPOCHS} epoch")
    common = [name for name in trained if all(runs[(name, c, None)] for c in ("fisher", "taylor", "l2"))]

    def mean_points(criterion: str, key: str) -> str:
        return _signed(_mean([(runs[(name, criterion, None)][key] - dense[name]["accuracy"]) * 100 for name in common]), 2)

    gains = [(runs[(name, c, None)]["accuracy_recalibrated"] - runs[(name, c, None)]["accuracy_pruned"]) * 100
             for name in trained for c, z in RUNS if z is None and runs[(name, c, None)]
             and runs[(name, c, None)].get("accuracy_recalibrated") is not None]
    diagnosed = [name for name in trained if diagnoses.get(name)]
    criteria = {name: diagnoses[name]["criteria"] for name in diagnosed}
    pooled = [criteria[name]["fisher"]["spearman_pooled"]["none"] for name in diagnosed]
    best_pooled = [name for name in diagnosed if all(
        criteria[name]["fisher"]["spearman_pooled"]["none"] >= values["spearman_pooled"]["none"]
        for criterion, values in criteria[name].items() if not criterion.startswith("fisher"))]
    best_within = [name for name in diagnosed if all(
        criteria[name]["fisher"]["spearman_within_family_mean"] >= values["spearman_within_family_mean"]
        for criterion, values in criteria[name].items() if not criterion.startswith("fisher"))]
    mass = [diagnoses[name]["saturation"]["fisher_mass_misclassified"] for name in diagnosed]
    wrong = [diagnoses[name]["saturation"]["share_misclassified"] for name in diagnosed]
    sure = [diagnoses[name]["saturation"]["share_correct_above_0.99"] for name in diagnosed]
    batch_gap = [criteria[name]["fisher (per batch)"]["spearman_pooled"]["none"] - criteria[name]["fisher"]["spearman_pooled"]["none"]
                 for name in diagnosed]
    ratios = [plan_["loss increase"] / plan_["diagonal"] for plan_ in (_worst_underestimate(diagnoses[n])[1] for n in diagnosed)]
    text = ["**Decision: fixed at its cause; Fisher, ranking the loss per MAC, is the criterion for classifiers with "
            "labelled calibration data.** Fisher's estimate of one unit is not what failed: pooled over all families "
            f"(as the global ranking compares them) its scores follow the real removal losses with ρ {min(pooled):.2f}–"
            f"{max(pooled):.2f}, the best of every criterion on {len(best_pooled)} of the {len(diagnosed)} CNNs diagnosed "
            f"(within one family it is the best on {len(best_within)} of them); gradients per batch instead of per "
            f"image change the pooled ρ by {_signed(min(batch_gap), 2)} to {_signed(max(batch_gap), 2)}; and although "
            f"{min(mass) * 100:.0f}–{max(mass) * 100:.0f} % of its mass comes from the {min(wrong) * 100:.1f}–"
            f"{max(wrong) * 100:.1f} % of images the model gets wrong ({min(sure) * 100:.0f}–{max(sure) * 100:.0f} % "
            "are right with p > 0.99: saturated), the ranking "
            "stays the best. What failed is comparing raw "
            "losses across families while buying MACs: a unit of a late, low-resolution layer costs few MACs and "
            "little loss alone, so the raw ranking takes most of such a family and has to remove more units, and more "
            "parameters, to reach the target; and removing most of a family is far outside the second-order model, "
            f"whose additive estimate undervalues the real loss of the worst family {min(ratios):.0f} to "
            f"{max(ratios):.0f} times (cross terms do not rescue it). Ranking the loss per MAC or parameter removed "
            "(`normalize: cost`, Fisher's default in `structure/importance/fisher.py`) is the greedy answer to buying "
            "the target at the least estimated loss: " + "; ".join(changes) + "."]
    if places:
        text.append("Fisher with that ranking, against every criterion measured on the same CNN (places by "
                    "accuracy, 1 the best): "
                    + "; ".join(places) + "." + (
                        f" Mean Δ after {RECOVERY_EPOCHS} epoch over {', '.join(common)}: Fisher "
                        f"{mean_points('fisher', 'accuracy_recovered')}, Taylor {mean_points('taylor', 'accuracy_recovered')}, "
                        f"L2 {mean_points('l2', 'accuracy_recovered')} points; BN re-estimated: Fisher "
                        f"{mean_points('fisher', 'accuracy_recalibrated')}, Taylor "
                        f"{mean_points('taylor', 'accuracy_recalibrated')}, L2 {mean_points('l2', 'accuracy_recalibrated')}."
                        if len(common) > 1 else ""))
    fewer = [name for name in with_fisher if runs[(name, "l2", None)]
             and runs[(name, "fisher", None)]["parameters"] < runs[(name, "l2", None)]["parameters"]]
    if fewer:
        text.append(f"Fisher still leaves fewer parameters than L2 on {len(fewer)} of "
                    f"{sum(1 for name in with_fisher if runs[(name, 'l2', None)])} CNNs: it buys the MAC target at the "
                    "least estimated loss, not parameters (with `target: params` the same ranking is the loss per "
                    "parameter).")
    text.append("Without labelled calibration data, L2 (`prune_structure`'s default, no data needed) is the fallback. "
                f"Caveats: one seed; after {RECOVERY_EPOCHS} epoch the criteria are within a point or two of one another, "
                "about the noise of one run; these CNNs are small and narrow, so half the MACs takes every criterion "
                "far below the dense accuracy before recovery, and most of that loss is stale BatchNorm statistics: "
                f"re-estimating them on the calibration images alone gives back {min(gains):.0f} to {max(gains):.0f} points. "
                "Fisher scores one backward pass per calibration image: the slowest criterion here (seconds to a "
                "minute at 1,024 images on 2 shared cores).")
    return "\n\n".join(text)


def splice_docs(text: str, section: str) -> str:
    """``text`` (docs/structure.md) with the generated section between its markers (placed before "## Bad
    input" the first time); nothing else changes."""
    block = f"{DOCS_BEGIN}\n{section}\n{DOCS_END}"
    if DOCS_BEGIN in text:
        start = text.index(DOCS_BEGIN)
        end = text.index(DOCS_END, start) + len(DOCS_END)
        return text[:start] + block + text[end:]
    at = text.index(DOCS_BEFORE)
    return text[:at] + "\n" + block + "\n" + text[at:]


def report(docs: bool = False) -> None:
    dense = {name: _load(f"{name}-dense") for name in MODELS}
    runs = {(name, criterion, normalize): _load(run_name(name, criterion, normalize))
            for name in MODELS for criterion, normalize in RUNS}
    steps = {name: _load(f"{name}-steps") for name in MODELS}
    diagnoses = {name: _load(f"{name}-diagnosis") for name in MODELS}
    trained = [name for name in MODELS if dense[name]]
    sections = [f"# Structural criteria for classifiers: four CNNs, half the MACs removed\n\n"
                f"Fashion-MNIST; each CNN trained {EPOCHS} epochs (seed {SEED}). Calibration: {CALIBRATION} shuffled "
                f"training images (seeded). Pruning: {RATIO:.0%} of one image's MACs removed, channels, global "
                f"allocation (floor {ALLOCATION['floor']}, widths multiples of {ALLOCATION['round_to']}), each criterion's "
                f"default normalisation. Recovery: {RECOVERY_EPOCHS} epoch of cross-entropy at lr {RECOVERY_LR}. "
                "Accuracy on the 10 000 test images; Δ in points against the dense model. "
                "`python benchmarks/structure_cnn_defaults.py all --lock /tmp/prunekit-cpu.lock` reproduces it."]
    rows = [(name, MODELS[name][1], f"{dense[name]['parameters']:,}", f"{dense[name]['macs']:,}",
             f"{dense[name]['accuracy']:.2%}", f"{dense[name]['train_accuracy']:.2%}", f"{dense[name]['train_seconds']:.0f}")
            for name in trained]
    sections.append("## Dense models\n\n" + markdown_table(
        ["model", "shape", "parameters", "MACs / image", "test accuracy", "train accuracy", "train s"], rows))
    sections += _main_tables(dense, runs, trained)
    sections += [_diagnosis_section(name, diagnoses[name], dense[name]) for name in trained if diagnoses[name]]
    rows = [(name, run["label"], run["steps"], f"{run['accuracy_pruned']:.2%}", f"{run['accuracy_recalibrated']:.2%}",
             f"{run['parameters']:,}", f"{run['macs_fraction']:.3f}", f"{run['prune_seconds']:.1f}", run["widths"][-1])
            for name in trained if steps[name] for run in steps[name]["runs"]]
    if rows:
        sections.append(f"## Pruning in steps\n\nThe same half of the MACs removed in up to {STEPS} steps, each scored anew "
                        "on the model the previous one left (the main runs' floor in every step, so a family can end "
                        "below it), no recovery:\n\n" + markdown_table(
                            ["model", "criterion", "steps", "accuracy pruned", "BN re-estimated", "parameters left",
                             "MACs of dense", "prune s", "kept widths"], rows))
    missing = [name for name, _ in plan() if not (RAW / f"{name}.json").exists()]
    if missing:
        sections.append(f"Not run yet: {', '.join(missing)}.")
    text = "\n\n".join(sections) + "\n"
    write_json(ROOT / "structure_cnn_defaults.json",
               {"protocol": {"epochs": EPOCHS, "calibration": CALIBRATION, "ratio": RATIO, "target": "macs",
                             "allocation": ALLOCATION, "recovery_epochs": RECOVERY_EPOCHS, "recovery_lr": RECOVERY_LR,
                             "seed": SEED},
                "dense": dense, "runs": [run for run in runs.values() if run], "diagnoses": diagnoses,
                "steps": steps})
    (ROOT / "structure_cnn_defaults.md").write_text(text)
    print(text)
    if docs:
        DOCS.write_text(splice_docs(DOCS.read_text(), docs_section(dense, runs, diagnoses, trained)))
        print(f"wrote the section of {DOCS}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    train_parser = sub.add_parser("train", help="train one dense CNN")
    train_parser.add_argument("--model", choices=sorted(MODELS), required=True)
    train_parser.add_argument("--epochs", type=int, default=EPOCHS)
    shrink_parser = sub.add_parser("shrink", help="prune one CNN with one criterion, recover one epoch")
    shrink_parser.add_argument("--model", choices=sorted(MODELS), required=True)
    shrink_parser.add_argument("--importance", choices=CRITERIA, required=True)
    shrink_parser.add_argument("--normalize", help="cross-family normalisation instead of the criterion's default")
    diagnose_parser = sub.add_parser("diagnose", help="each unit's real removal loss against every criterion")
    diagnose_parser.add_argument("--model", choices=sorted(MODELS), required=True)
    iterate_parser = sub.add_parser("iterate", help="prune in steps, scoring anew after each")
    iterate_parser.add_argument("--model", choices=sorted(MODELS), required=True)
    report_parser = sub.add_parser("report", help="the tables, from the result files")
    report_parser.add_argument("--docs", action="store_true",
                               help="also write the section of docs/structure.md (between its markers)")
    sub.add_parser("plan", help="list every run of 'all' with its command and whether its result exists")
    all_parser = sub.add_parser("all", help="every run in order (resumable), then the report")
    all_parser.add_argument("--lock", help="run each phase under 'flock LOCK' (e.g. /tmp/prunekit-cpu.lock)")
    args = parser.parse_args(argv)
    if args.phase == "train":
        train(args.model, args.epochs)
    elif args.phase == "shrink":
        shrink(args.model, args.importance, args.normalize)
    elif args.phase == "diagnose":
        diagnose(args.model)
    elif args.phase == "iterate":
        iterate(args.model)
    elif args.phase == "plan":
        print_plan(__file__, plan(), RAW)
    elif args.phase == "all":
        run_phases(__file__, plan(), RAW, args.lock, report)
    else:
        report(args.docs)


if __name__ == "__main__":
    main(sys.argv[1:])
