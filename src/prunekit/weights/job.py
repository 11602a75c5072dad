"""The main job: load a model, prune it, evaluate it, and write the model, its compressed copy and a report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunekit.core.masks import sparsity_of
from prunekit.core.progress import status
from prunekit.core.text import TextProtocol, calibration_windows, test_windows
from prunekit.evaluate.perplexity import PerplexityResult, perplexity
from prunekit.evaluate.plots import plot_curves, plot_layer_sparsity
from prunekit.evaluate.report import SPEED_NOTE, environment, human_bytes, markdown_table, write_json
from prunekit.evaluate.resources import Measured, process_peak_rss
from prunekit.io.atomic import atomic_directory, check_output_dir, directory_size
from prunekit.io.checkpoint import COMPRESSED_WEIGHTS, write_compressed, write_dense
from prunekit.io.sparse_format import manifest_size_without_codec
from prunekit.models.base import adapter_for
from prunekit.models.loading import LoadedModel, load_causal_lm
from prunekit.weights.pipeline import PruneResult, check_finite_weights, prune_weights
from prunekit.weights.recipe import WeightPruningRecipe

COMPRESSED_SUBDIR = "compressed"


@dataclass
class JobOutcome:
    report: dict
    out_dir: Path | None
    markdown: str = ""
    extra: dict = field(default_factory=dict)


def model_sparsity(model: torch.nn.Module) -> float:
    total = zeros = 0
    seen = set()
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        zeros += parameter.numel() - int(torch.count_nonzero(parameter))
    return zeros / max(total, 1)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _load(recipe: WeightPruningRecipe) -> LoadedModel:
    loaded = load_causal_lm(recipe.model, dtype=recipe.dtype, device=recipe.device,
                            trust_remote_code=recipe.trust_remote_code)
    check_finite_weights(loaded.model)
    return loaded


def _windows(loaded: LoadedModel, protocol: TextProtocol, calibrate: bool, evaluate: bool):
    if loaded.tokenizer is None:
        raise ValueError("a tokenizer is needed")
    calibration = calibration_windows(loaded.tokenizer, protocol) if calibrate else None
    test = test_windows(loaded.tokenizer, protocol) if evaluate else None
    return calibration, test


def _needs_calibration(recipe: WeightPruningRecipe) -> bool:
    from prunekit.core.allocation import get_allocation
    from prunekit.weights.base import get_method

    return get_method(recipe.method).needs_calibration or get_allocation(recipe.allocation).needs == "activation_scores"


def _prune(loaded: LoadedModel, recipe: WeightPruningRecipe, calibration: torch.Tensor | None) -> PruneResult:
    return prune_weights(loaded.model, method=recipe.method, sparsity=recipe.effective_sparsity,
                         pattern=recipe.pattern, allocation=recipe.allocation, calibration=calibration,
                         include=recipe.include, exclude=recipe.exclude, overrides=recipe.overrides,
                         sequential=recipe.sequential, batch_size=recipe.batch_size,
                         untie_embeddings=recipe.untie_embeddings)


def run_prune_job(recipe: WeightPruningRecipe, out: str | Path, overwrite: bool = False) -> JobOutcome:
    out_path = check_output_dir(out, overwrite, inputs=(recipe.model,))
    if not (recipe.save_dense or recipe.save_compressed):
        raise ValueError("nothing to save")
    torch.manual_seed(recipe.data.seed)
    protocol = recipe.data.protocol()
    loaded = _load(recipe)
    # Recipes are checked before the (slow) data and pruning steps, against the loaded model.
    calibration, test = _windows(loaded, protocol, _needs_calibration(recipe), recipe.evaluate)
    before = perplexity(loaded.model, test, recipe.batch_size, "Perplexity before") if test is not None else None
    with Measured() as measured:
        result = _prune(loaded, recipe, calibration)
    after = perplexity(loaded.model, test, recipe.batch_size, "Perplexity after") if test is not None else None

    with atomic_directory(out_path, overwrite) as tmp:
        sizes = {}
        if recipe.save_dense:
            with status("Saving the dense model (loads with from_pretrained)"):
                write_dense(loaded.model, tmp, loaded.tokenizer)
            sizes["dense_bytes"] = directory_size(tmp, "*.safetensors")
        if recipe.save_compressed:
            with status(f"Saving the compressed model ({recipe.codec})"):
                (tmp / COMPRESSED_SUBDIR).mkdir()
                manifest = write_compressed(loaded.model, tmp / COMPRESSED_SUBDIR, loaded.tokenizer, recipe.codec)
            sizes["compressed_bytes"] = (tmp / COMPRESSED_SUBDIR / COMPRESSED_WEIGHTS).stat().st_size
            sizes["compressed_without_codec_bytes"] = manifest_size_without_codec(manifest)
            sizes["codec"] = recipe.codec
        if "dense_bytes" not in sizes:
            sizes["dense_bytes"] = sum(p.numel() * p.element_size()
                                       for p in {id(p): p for p in loaded.model.parameters()}.values())
        if "compressed_bytes" in sizes:
            sizes["compressed_ratio"] = sizes["compressed_bytes"] / sizes["dense_bytes"]
        report = build_report(loaded, recipe, protocol, result, before, after, measured, sizes)
        markdown = report_markdown(report)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        plot_layer_sparsity([l.name for l in result.layers], [l.target_sparsity for l in result.layers],
                            [l.achieved_sparsity for l in result.layers], tmp / "sparsity.png",
                            f"{loaded.name}: {result.method['name']} {result.pattern}, {result.allocation['name']}")
    return JobOutcome(report=report, out_dir=out_path, markdown=markdown)


def build_report(loaded: LoadedModel, recipe: WeightPruningRecipe, protocol: TextProtocol, result: PruneResult,
                 before: PerplexityResult | None, after: PerplexityResult | None, measured: Measured,
                 sizes: dict) -> dict:
    adapter = adapter_for(loaded.model)
    return {
        "model": {"name": loaded.name, "path": str(loaded.path) if loaded.path else None,
                  "family": adapter.describe(), "parameters": parameter_count(loaded.model), "dtype": recipe.dtype},
        "method": result.method,
        "pattern": result.pattern,
        "allocation": result.allocation,
        "sequential": result.sequential,
        "sparsity": {"target": result.sparsity, "achieved_in_targets": result.achieved_sparsity,
                     "achieved_in_model": model_sparsity(loaded.model),
                     "target_parameters": result.to_dict()["target_parameters"]},
        "layers": [{"name": l.name, "shape": list(l.shape), "block": l.block, "target": l.target_sparsity,
                    "achieved": l.achieved_sparsity} for l in result.layers],
        "protocol": protocol.describe(),
        "perplexity": {"before": before.perplexity if before else None, "after": after.perplexity if after else None},
        "timing": {"prune_seconds": measured.seconds, "allocation_seconds": result.allocation_seconds},
        "memory": {"peak_rss_during_prune_bytes": measured.peak_rss, "process_peak_rss_bytes": process_peak_rss()},
        "size": sizes,
        "speed_note": SPEED_NOTE,
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "environment": environment(),
    }


def report_markdown(report: dict) -> str:
    ppl = report["perplexity"]
    size = report["size"]
    method = ", ".join(f"{k}={v}" for k, v in report["method"].items() if k != "name")
    allocation = ", ".join(f"{k}={v}" for k, v in report["allocation"].items() if k != "name")
    rows = [
        ("model", f"{report['model']['name']} ({report['model']['parameters']:,} parameters, {report['model']['dtype']})"),
        ("method", report["method"]["name"] + (f" ({method})" if method else "")),
        ("pattern", report["pattern"]),
        ("allocation", report["allocation"]["name"] + (f" ({allocation})" if allocation else "")),
        ("calibration order", report["sequential"]),
        ("target sparsity", f"{report['sparsity']['target']:.2%}"),
        ("achieved sparsity (targeted layers)", f"{report['sparsity']['achieved_in_targets']:.2%}"),
        ("achieved sparsity (all parameters)", f"{report['sparsity']['achieved_in_model']:.2%}"),
        ("perplexity before", ppl["before"]),
        ("perplexity after", ppl["after"]),
        ("prune wall time", f"{report['timing']['prune_seconds']:.1f} s"),
        ("peak RSS during pruning", human_bytes(report["memory"]["peak_rss_during_prune_bytes"])),
        ("dense weights on disk", human_bytes(size["dense_bytes"])),
    ]
    if "compressed_bytes" in size:
        rows.append(("compressed weights on disk",
                     f"{human_bytes(size['compressed_bytes'])} ({size['compressed_ratio']:.1%} of dense; "
                     f"{human_bytes(size['compressed_without_codec_bytes'])} as bitmask + values before {size['codec']})"))
    protocol = report["protocol"]
    lines = [f"# prunekit report: {report['model']['name']}", "", markdown_table(["", ""], rows), "",
             "## Data protocol", "",
             f"- calibration: {protocol['calibration']}, {protocol['calibration_split']}; {protocol['calibration_windows']}",
             f"- test: {protocol['test']}, {protocol['test_split']}; {protocol['test_protocol']}", "",
             "## Speed", "", report["speed_note"], "", "## Per-layer sparsity", "",
             markdown_table(["layer", "shape", "allocated", "achieved"],
                            [(l["name"], "×".join(map(str, l["shape"])), f"{l['target']:.4f}", f"{l['achieved']:.4f}")
                             for l in report["layers"]]), "",
             f"Environment: {json.dumps(report['environment'])}", ""]
    return "\n".join(lines)


def run_sweep(recipe: WeightPruningRecipe, sparsities: list[float], out: str | Path, overwrite: bool = False) -> JobOutcome:
    """Prune the same model at several sparsities (restoring it in between) and plot perplexity."""
    out_path = check_output_dir(out, overwrite, inputs=(recipe.model,))
    protocol = recipe.data.protocol()
    loaded = _load(recipe)
    calibration, test = _windows(loaded, protocol, _needs_calibration(recipe), True)
    pristine = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    dense = perplexity(loaded.model, test, recipe.batch_size, "Perplexity dense")
    points = []
    for value in sparsities:
        loaded.model.load_state_dict(pristine)
        step = recipe.model_copy(update={"sparsity": value})
        WeightPruningRecipe.model_validate(step.model_dump())
        with Measured() as measured:
            result = _prune(loaded, step, calibration)
        after = perplexity(loaded.model, test, recipe.batch_size, f"Perplexity at {value:.0%}")
        points.append({"sparsity": value, "achieved": result.achieved_sparsity, "perplexity": after.perplexity,
                       "prune_seconds": measured.seconds})
    report = {"model": loaded.name, "method": recipe.method, "pattern": recipe.pattern,
              "allocation": recipe.allocation, "dense_perplexity": dense.perplexity, "points": points,
              "protocol": protocol.describe(), "environment": environment()}
    table = markdown_table(["sparsity", "achieved", "perplexity", "prune s"],
                           [(f"{p['sparsity']:.0%}", f"{p['achieved']:.4f}", p["perplexity"], f"{p['prune_seconds']:.1f}")
                            for p in points])
    markdown = (f"# Sparsity sweep: {loaded.name}, {recipe.method['name']} ({recipe.allocation['name']})\n\n"
                f"Dense perplexity: {dense.perplexity:.4g}\n\n{table}\n\nProtocol: {protocol.summary()}\n")
    with atomic_directory(out_path, overwrite) as tmp:
        write_json(tmp / "sweep.json", report)
        (tmp / "sweep.md").write_text(markdown)
        plot_curves({recipe.method["name"]: ([p["sparsity"] * 100 for p in points], [p["perplexity"] for p in points])},
                    tmp / "sweep.png", "sparsity (%)", "perplexity (log scale)",
                    f"{loaded.name}: perplexity against sparsity", log_y=True, reference=("dense", dense.perplexity))
    return JobOutcome(report=report, out_dir=out_path, markdown=markdown)


def sparsity_by_layer(model: torch.nn.Module) -> dict[str, float]:
    return {name: sparsity_of(p.detach()) for name, p in model.named_parameters() if p.dim() == 2}
