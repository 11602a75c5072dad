"""The ``prunekit shrink`` job: load a Hugging Face model, measure it, remove blocks and/or widths,
optionally recover, measure again, and write the smaller model with its report; and the
``prunekit shrink-graph`` job beside it, which lists what could be removed. Both are ``Job``s.

Causal language models are judged by perplexity on the pinned text protocol; encoders (BERT,
all-MiniLM-L6-v2) by embedding fidelity, the mean cosine similarity between the shrunk and the
unpruned model's mean-pooled embeddings of the test windows.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.job import Job, Outcome
from prunekit.core.progress import status
from prunekit.core.text import TextProtocol, calibration_windows, random_windows, source_text, test_windows, tokenize
from prunekit.errors import PrunekitError
from prunekit.evaluate.measure import count_parameters
from prunekit.evaluate.perplexity import perplexity, window_losses
from prunekit.evaluate.report import environment, human_bytes, markdown_table
from prunekit.evaluate.resources import Measured
from prunekit.io.shards import model_tensor_bytes
from prunekit.models.base import ModelAdapter, adapter_for
from prunekit.models.loading import CAUSAL_LM, ENCODER, LoadedModel, load_model, resolve_model_dir
from prunekit.structure.depth import DepthResult, prune_depth
from prunekit.structure.graph import DependencyGraph, build_graph
from prunekit.structure.measure import Measurement, SpeedProtocol, compare, lm_inputs, measure_side_by_side
from prunekit.structure.peak_memory import describe as describe_memory
from prunekit.structure.pipeline import (StructuredResult, check_plan, encoder_calibration, lm_calibration,
                                         lm_example_inputs, prune_structure)
from prunekit.structure.recipe import ShrinkGraphRecipe, ShrinkRecipe
from prunekit.structure.saving import check_onnx, export_onnx, save_structured
from prunekit.structure.shrink_method import get_shrink_method
from prunekit.training.recovery import RecoveryResult, recover

ONNX_FILE = "model.onnx"


@dataclass
class Quality:
    """The quality metric before pruning, after it and after recovery (None where not measured)."""

    metric: str
    before: float | None = None
    after_pruning: float | None = None
    after_recovery: float | None = None


@dataclass
class ShrinkRun:
    """What one shrink run found, handed whole to the report; writing adds what it saved."""

    loaded: LoadedModel
    protocol: TextProtocol
    parameters_before: int
    quality: Quality
    speed_before: Measurement
    speed_after: Measurement
    depth: DepthResult | None
    width: StructuredResult | None
    recovery: RecoveryResult | None
    pruning: Measured
    method: dict | None  # what a shrink method (svd-llm, ...) did, instead of ``width``
    total_seconds: float
    size_before: int | None = None
    saved: dict | None = None
    onnx: dict | None = None


def _mean_pooled(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            hidden = model(input_ids=windows[start:start + batch_size]).last_hidden_state
            outputs.append(hidden.mean(1))
    return torch.cat(outputs)


def embedding_fidelity(reference: torch.Tensor, model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean cosine similarity between the model's and the reference's mean-pooled embeddings."""
    return float(F.cosine_similarity(_mean_pooled(model, windows, batch_size), reference, dim=-1).mean())


def _disk_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) or None


def _speed_protocol(recipe: ShrinkRecipe) -> SpeedProtocol:
    measure = recipe.measure
    return SpeedProtocol(tuple(measure.batch_sizes), measure.runs, measure.warmup, measure.threads, measure.seq_len)


def _speeds(loaded: LoadedModel, original: nn.Module, recipe: ShrinkRecipe) -> tuple[Measurement, Measurement]:
    """Speed of the original and of the shrunk model, timed side by side."""
    protocol = _speed_protocol(recipe)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    make = lm_inputs(recipe.measure.seq_len, vocab, recipe.data.seed)
    if loaded.kind == "encoder":
        inner = make
        make = lambda batch: {"input_ids": inner(batch)["input_ids"]}  # noqa: E731 - encoders take no cache flag
    speeds = measure_side_by_side({"before": original, "after": loaded.model}, make, recipe.measure.seq_len, protocol,
                                  unit="tokens", memory=recipe.measure.memory)
    return speeds["before"], speeds["after"]


def _encoder_windows(tokenizer, protocol: TextProtocol, part: str) -> torch.Tensor:
    text = source_text(protocol.calibration if part == "calibration" else protocol.test, part, protocol)
    tokens = tokenize(tokenizer, text)
    if part == "calibration":
        return random_windows(tokens, protocol.calibration_samples, protocol.seq_len, protocol.seed)
    from prunekit.core.text import consecutive_windows

    return consecutive_windows(tokens, protocol.test_windows, protocol.seq_len)


def _example_inputs(kind: str) -> dict:
    return lm_example_inputs() if kind == CAUSAL_LM else {"input_ids": torch.arange(1, 5).unsqueeze(0)}


class ShrinkJob(Job[ShrinkRecipe]):
    """Shrink a causal language model or an encoder by depth and/or width; write it, its report and plot."""

    command = "shrink"
    recipe_type = ShrinkRecipe

    def expected_bytes(self):
        recipe = self.recipe  # the shrunk model is at most the original's size (once more as model.onnx)
        return lambda: (1 + recipe.onnx) * model_tensor_bytes(resolve_model_dir(recipe.model)[1], recipe.dtype)

    def run(self) -> Outcome:
        torch.manual_seed(self.recipe.data.seed)
        loaded = self.loaded = load_model(self.recipe.model, kind=(CAUSAL_LM, ENCODER), dtype=self.recipe.dtype,
                                          trust_remote_code=self.recipe.trust_remote_code)
        loaded.require_tokenizer()
        adapter_for(loaded.model, blocks=self.recipe.blocks)  # --blocks holds for every later step
        # The criterion is named here, so that the report and recipe.yaml name it.
        recipe = self.recipe = self.recipe.with_default_importance(loaded.kind)
        protocol = recipe.data.protocol()
        _check(loaded, recipe, protocol)
        started = self.started = time.perf_counter()
        graph = _checked_graph(loaded, recipe)
        if loaded.kind == CAUSAL_LM:
            calibration = calibration_windows(loaded.tokenizer, protocol)
            test = test_windows(loaded.tokenizer, protocol) if recipe.evaluate else None
        else:
            calibration = _encoder_windows(loaded.tokenizer, protocol, "calibration")
            test = _encoder_windows(loaded.tokenizer, protocol, "test") if recipe.evaluate else None
        judge = _Judge(loaded, test, recipe.batch_size)
        parameters_before = count_parameters(loaded.model)
        quality = Quality(judge.metric, judge("before"))
        # The unpruned copy is the distillation teacher and the speed reference timed next to the shrunk model.
        original = copy.deepcopy(loaded.model)
        depth_result = width_result = recovery_result = method_result = None
        with Measured() as pruning:
            if recipe.depth.blocks:
                depth_result = _depth(loaded, adapter_for(loaded.model), recipe, calibration)
            if recipe.ratio > 0 and recipe.method is not None:
                method_result = get_shrink_method(recipe.method).apply(loaded.model, calibration, recipe.ratio,
                                                                       recipe.batch_size)
            elif recipe.ratio > 0:
                make_calibration = lm_calibration if loaded.kind == CAUSAL_LM else encoder_calibration
                width_result = prune_structure(loaded.model, example_inputs=_example_inputs(loaded.kind),
                                               settings=recipe.width_settings(),
                                               calibration=make_calibration(calibration, recipe.batch_size),
                                               adapter=adapter_for(loaded.model), graph=graph)
                if width_result.search is not None:
                    # the recipe written carries the widths found, so it reproduces the model without searching
                    found = recipe.allocation.model_copy(update={"widths": width_result.search["widths"]})
                    recipe = self.recipe = recipe.model_copy(update={"allocation": found})
        quality.after_pruning = judge("after pruning")
        if recipe.recovery is not None:
            recovery_result = _recover(loaded, recipe, protocol, original)
            quality.after_recovery = judge("after recovery")
        speed_before, speed_after = _speeds(loaded, original, recipe)
        del original
        self.state = ShrinkRun(loaded, protocol, parameters_before, quality, speed_before, speed_after, depth_result,
                               width_result, recovery_result, pruning, method_result, time.perf_counter() - started,
                               _disk_bytes(loaded.path))
        return self._outcome(Outcome({}))

    def _outcome(self, outcome: Outcome) -> Outcome:
        outcome.report = build_report(self.state, self.recipe)
        outcome.markdown = report_markdown(outcome.report)
        outcome.summary = summary_rows(outcome.report)
        outcome.title = f"prunekit shrink: {self.loaded.name}"
        return outcome

    def write(self, directory: Path, outcome: Outcome) -> None:
        state, loaded = self.state, self.loaded
        depth = state.depth
        blocks = {depth.path: [i for i in range(depth.blocks_before) if i not in depth.removed]} if depth else None
        with status("Saving the shrunk model"):
            state.saved = save_structured(loaded.model, directory, loaded.tokenizer, adapter_for(loaded.model),
                                          blocks).to_dict()
        if self.recipe.onnx:
            state.onnx = _export(loaded, directory)
        if state.width is not None:
            _plot_widths(state.width.plan.widths, directory / "widths.png", loaded.name)
        state.total_seconds = time.perf_counter() - self.started  # writing included
        self._outcome(outcome)


def _check(loaded: LoadedModel, recipe: ShrinkRecipe, protocol: TextProtocol) -> None:
    """Requests the model cannot take, refused before any slow step."""
    if loaded.kind == ENCODER and recipe.recovery is not None:
        raise PrunekitError("recovery fine-tuning is implemented for causal language models and classifiers, "
                            "not for encoders without a training objective")
    if loaded.kind == ENCODER and recipe.depth.blocks and recipe.depth.criterion in ("perplexity", "search"):
        raise PrunekitError(f"the {recipe.depth.criterion} depth criterion needs a causal language model; "
                            "use influence")
    if loaded.kind == ENCODER:
        max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
        if max_positions and protocol.seq_len > max_positions:
            raise PrunekitError(f"--seq-len {protocol.seq_len} exceeds the encoder's {max_positions} positions")
    if loaded.kind == ENCODER and recipe.allocation.searched and recipe.allocation.widths is None:
        raise PrunekitError(f"allocation {recipe.allocation.name} measures the KL of a causal language model's "
                            "logits; use global or uniform for encoders")
    if recipe.method is not None and loaded.kind != CAUSAL_LM:
        raise PrunekitError(f"{recipe.method['name']} is implemented for causal language models")
    if recipe.method is not None and recipe.ratio > 0:
        get_shrink_method(recipe.method).check(loaded.model)
    if recipe.depth.blocks:
        blocks = len(adapter_for(loaded.model).blocks())
        if recipe.depth.blocks >= blocks:
            raise PrunekitError(f"cannot remove {recipe.depth.blocks} of {blocks} blocks; keep at least one")


def _checked_graph(loaded: LoadedModel, recipe: ShrinkRecipe) -> DependencyGraph | None:
    """The width plan checked before the slow steps; its graph is reused for pruning since the model is unchanged
    until then (a depth cut changes it: the graph is then traced after it)."""
    if recipe.ratio == 0 or recipe.depth.blocks or recipe.method is not None:
        return None
    settings = recipe.width_settings()
    graph = build_graph(loaded.model, _example_inputs(loaded.kind), adapter=adapter_for(loaded.model),
                        head_mode=settings.head_mode, strict=settings.strict)
    check_plan(graph, settings)
    return graph


class _Judge:
    """The quality metric of the model as it is now: perplexity, or an encoder's cosine to its unpruned self."""

    def __init__(self, loaded: LoadedModel, test: torch.Tensor | None, batch_size: int):
        self.loaded, self.test, self.batch_size = loaded, test, batch_size
        causal = loaded.kind == CAUSAL_LM
        self.metric = "perplexity" if causal else "embedding cosine to the unpruned model"
        self.reference = None
        if not causal and test is not None:
            self.reference = _mean_pooled(loaded.model, test, batch_size)

    def __call__(self, label: str) -> float | None:
        if self.test is None:
            return None
        if self.loaded.kind == CAUSAL_LM:
            return perplexity(self.loaded.model, self.test, self.batch_size, f"Perplexity {label}").perplexity
        return embedding_fidelity(self.reference, self.loaded.model, self.test, self.batch_size)


def _recover(loaded: LoadedModel, recipe: ShrinkRecipe, protocol: TextProtocol, original: nn.Module) -> RecoveryResult:
    settings = recipe.recovery
    train_text = tokenize(loaded.tokenizer, source_text(protocol.calibration, "calibration", protocol))
    train = random_windows(train_text, settings.samples, protocol.seq_len, protocol.seed + 1)
    teacher = original if settings.mode == "distill" else None
    return recover(loaded.model, train, settings.plan(recipe.data.seed), teacher=teacher)


def _depth(loaded: LoadedModel, adapter: ModelAdapter, recipe: ShrinkRecipe, calibration: torch.Tensor):
    settings = recipe.depth
    if loaded.kind == "causal-lm":
        batches = lm_calibration(calibration, recipe.batch_size).batches
    else:
        batches = encoder_calibration(calibration, recipe.batch_size).batches
    windows = calibration[:settings.windows]

    def mean_loss(model: nn.Module) -> float:
        losses = window_losses(model, windows, recipe.batch_size, "Perplexity")
        return sum(losses) / len(losses)

    judge = mean_loss if settings.criterion == "perplexity" else None
    if settings.criterion == "search":  # measured on token ids: KL of the final next-token distributions
        batches = list(calibration.split(recipe.batch_size))
    return prune_depth(loaded.model, adapter.blocks_path, settings.blocks, settings.criterion, batches, judge,
                       search=settings.search)


def _export(loaded: LoadedModel, directory: Path) -> dict:
    example = (torch.randint(0, loaded.model.get_input_embeddings().num_embeddings, (1, 16),
                             generator=torch.Generator().manual_seed(0)),)
    pick = (lambda output: output.logits) if loaded.kind == "causal-lm" else (lambda output: output.last_hidden_state)
    wrapped = _Forward(loaded.model, loaded.kind)
    with status("Exporting to ONNX and checking it with onnxruntime"):
        export_onnx(wrapped, example, directory / ONNX_FILE, input_names=["input_ids"], output_fn=pick)
        difference = check_onnx(directory / ONNX_FILE, wrapped, example, output_fn=pick)
    return {"file": ONNX_FILE, "max_abs_difference": difference, "input": "input_ids (1, 16)",
            "bytes": (directory / ONNX_FILE).stat().st_size + sum(p.stat().st_size for p in directory.glob("*.onnx.data"))}


class _Forward(nn.Module):
    """Positional input ids (ONNX inputs are positional); no cache for language models."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids):
        if self.kind == "causal-lm":
            return self.model(input_ids=input_ids, use_cache=False)
        return self.model(input_ids=input_ids)


def _plot_widths(widths: dict[str, tuple[int, int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(widths)
    kept = [after / before * 100 for before, after in widths.values()]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.18 + 3), 4))
    colours = ["#dd8452" if "attn" in n or "attention" in n else "#4c72b0" for n in names]
    ax.bar(range(len(names)), kept, color=colours)
    ax.set_ylim(0, 100)
    ax.set_ylabel("kept units (%)")
    ax.set_xlabel("family (execution order; orange: attention heads)")
    ax.set_title(f"{title}: kept width per family")
    ax.set_xticks([])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def build_report(run: ShrinkRun, recipe: ShrinkRecipe) -> dict:
    """The report of a shrink run as data (``report.json``); what writing saved is filled in once written."""
    loaded, quality = run.loaded, run.quality
    before = 1.0 if (loaded.kind == ENCODER and quality.before is not None) else quality.before
    width = run.width
    return {
        "model": {"name": loaded.name, "path": str(loaded.path) if loaded.path else None, "kind": loaded.kind,
                  "family": adapter_for(loaded.model).describe(), "dtype": recipe.dtype},
        "settings": recipe.model_dump(mode="json", by_alias=True),
        "parameters": {"before": run.parameters_before, "after": run.speed_after.parameters,
                       "removed_fraction": 1 - run.speed_after.parameters / run.parameters_before},
        "quality": {"metric": quality.metric, "before": before, "after_pruning": quality.after_pruning,
                    "after_recovery": quality.after_recovery},
        "speed": {"protocol": _speed_protocol(recipe).describe()
                  + "; the original and the shrunk model timed side by side, their passes alternating",
                  "before": run.speed_before.to_dict(), "after": run.speed_after.to_dict(),
                  "ratios": compare(run.speed_before, run.speed_after)},
        "size": {"before_bytes": run.size_before, "after_bytes": run.saved["weights_bytes"] if run.saved else None},
        "depth": run.depth.to_dict() if run.depth else None,
        "width": width.to_dict() if width else None,
        "method": run.method,
        "recovery": run.recovery.to_dict() if run.recovery else None,
        "saving": run.saved,
        "onnx": run.onnx,
        "timing": {"prune_seconds": run.pruning.seconds, "total_seconds": run.total_seconds,
                   **(width.seconds if width else {})},
        "memory": {"peak_rss_during_prune_bytes": run.pruning.peak_rss,
                   "inference": {"before": run.speed_before.memory, "after": run.speed_after.memory,
                                 "protocol": _memory_protocol(run.speed_before.memory)}},
        "protocol": run.protocol.describe(),
        "environment": environment(),
    }


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """The few lines the terminal shows."""
    speed, parameters, quality = report["speed"], report["parameters"], report["quality"]
    rows = [("parameters", f"{parameters['before']:,} → {parameters['after']:,} "
                           f"({parameters['removed_fraction']:.1%} removed)"),
            ("MACs (batch 1)", f"{speed['before']['macs']:,} → {speed['after']['macs']:,}")]
    for batch, ratio in speed["ratios"]["speedup"].items():
        rows.append((f"throughput, batch {batch}", f"{speed['before']['throughput'][batch]:.1f} → "
                                                   f"{speed['after']['throughput'][batch]:.1f} "
                                                   f"{speed['before']['unit']}/s ({ratio:.2f}×)"))
    if quality["before"] is not None:
        text = f"{quality['before']:.4g} → {quality['after_pruning']:.4g}"
        if quality["after_recovery"] is not None:
            text += f" → {quality['after_recovery']:.4g} after recovery"
        rows.append((quality["metric"], text))
    memory = report["memory"]["inference"]
    if memory["before"] and memory["after"] and "error" not in memory["before"] and "error" not in memory["after"]:
        rows.append((f"peak inference memory, batch {memory['before']['batch']}",
                     f"{memory['before']['peak_rss_bytes'] / 2**20:,.0f} → "
                     f"{memory['after']['peak_rss_bytes'] / 2**20:,.0f} MiB (fresh process each)"))
    rows.append(("prune time", f"{report['timing']['prune_seconds']:.1f} s"))
    saving = report["saving"]
    if saving is not None:
        rows.append(("from_pretrained", "yes" if saving["from_pretrained"] else
                     ("with trust_remote_code=True (model code saved beside it)" if saving.get("remote_code") else "no")
                     + "; prunekit.load rebuilds it (" + "; ".join(saving["reasons"]) + ")"))
    return rows


def _method_summary(method: dict | None) -> str:
    if not method:
        return "nothing factored"
    if "summary" in method:  # a method that says what it did in its own words
        return method["summary"]
    return (f"{len(method['layers'])} linears factored, their parameters {method['linear_parameters_before']:,} → "
            f"{method['linear_parameters_after']:,}; mean relative output error of a layer on its calibration inputs "
            f"{method['mean_relative_error']:.4f}")


def _memory_protocol(memory: dict | None) -> str | None:
    return describe_memory(memory["batch"], memory["runs"]) if (memory and "error" not in memory) else None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report_markdown(report: dict) -> str:
    speed = report["speed"]
    before, after = speed["before"], speed["after"]
    quality = report["quality"]
    rows = [("parameters", f"{before['parameters']:,}", f"{after['parameters']:,}",
             f"{after['parameters'] / before['parameters']:.3f}"),
            ("MACs per sequence (batch 1)", f"{before['macs']:,}", f"{after['macs']:,}",
             f"{after['macs'] / before['macs']:.3f}" if before["macs"] else "–")]
    for batch in before["latency_ms"]:
        rows.append((f"latency, batch {batch} (ms)", _fmt(before["latency_ms"][batch]), _fmt(after["latency_ms"][batch]),
                     f"{after['latency_ms'][batch] / before['latency_ms'][batch]:.3f}"))
        rows.append((f"throughput, batch {batch} ({before['unit']}/s)", _fmt(before["throughput"][batch]),
                     _fmt(after["throughput"][batch]),
                     f"{after['throughput'][batch] / before['throughput'][batch]:.3f}"))
    memory = report["memory"]["inference"]
    measured = bool(memory["before"] and memory["after"]) and not any("error" in memory[w] for w in ("before", "after"))
    if measured:
        batch = memory["before"]["batch"]
        for key, label in (("peak_rss_bytes", f"peak memory of inference, batch {batch} (fresh process)"),
                           ("inference_bytes", f"memory inference adds to the loaded model, batch {batch}")):
            rows.append((label, human_bytes(memory["before"][key]), human_bytes(memory["after"][key]),
                         f"{memory['after'][key] / memory['before'][key]:.3f}" if memory["before"][key] else "–"))
    size = report["size"]
    if size["after_bytes"] is not None:  # known once the model is written
        rows.append(("weights on disk", human_bytes(size["before_bytes"]) if size["before_bytes"] else "–",
                     human_bytes(size["after_bytes"]),
                     f"{size['after_bytes'] / size['before_bytes']:.3f}" if size["before_bytes"] else "–"))
    final = quality["after_recovery"] if quality["after_recovery"] is not None else quality["after_pruning"]
    rows.append((quality["metric"], _fmt(quality["before"]), _fmt(final),
                 f"{final / quality['before']:.3f}" if (final is not None and quality["before"]) else "–"))
    settings = report["settings"]
    if settings.get("method"):
        how = ", ".join(f"{k}={v}" for k, v in settings["method"].items() if k != "name")
        how = f"by {settings['method']['name']}" + (f" ({how})" if how else "")
        described = f"); {settings['method']['name']}: {_method_summary(report['method'])}."
    else:
        how = "by width"
        described = (f"); importance {settings['importance']['name']}, allocation {settings['allocation']['name']}, "
                     f"granularity {', '.join(settings['granularity'])}, heads mode {settings['heads']}.")
    lines = [f"# prunekit shrink: {report['model']['name']}", "",
             f"Removed {report['parameters']['removed_fraction']:.2%} of the parameters "
             f"({settings['target']} target {settings['ratio']:.0%} {how}"
             + (f", {settings['depth']['blocks']} blocks by {settings['depth']['criterion']}" if settings["depth"]["blocks"] else "")
             + described, "",
             markdown_table(["", "before", "after", "after / before"], rows), "",
             f"Quality ({quality['metric']}): before {_fmt(quality['before'])}, after pruning "
             f"{_fmt(quality['after_pruning'])}, after recovery {_fmt(quality['after_recovery'])}.", "",
             f"Speed: {speed['protocol']}. Prune wall time {report['timing']['prune_seconds']:.1f} s.", ""]
    if measured:
        lines += [f"Memory: {memory['protocol']} ({memory['before']['method']}). The pruning job's own peak, "
                  f"sampled, was {human_bytes(report['memory']['peak_rss_during_prune_bytes'])}.", ""]
    elif memory["before"] or memory["after"]:
        errors = {m["error"] for m in (memory["before"], memory["after"]) if m and "error" in m}
        lines += [f"Memory: peak inference memory was not measured ({'; '.join(sorted(errors))}).", ""]
    saving = report["saving"]
    if saving is None:
        lines.append("Loading: the model was not written.")
    elif saving["from_pretrained"]:
        lines.append("Loading: `AutoModel*.from_pretrained(DIR)` loads this directory (the config describes every "
                     "width); `prunekit.load(DIR)` works too.")
    else:
        lines.append("Loading: the config alone cannot describe this model (" + "; ".join(saving["reasons"]) + "). "
                     + ("`AutoModel*.from_pretrained(DIR, trust_remote_code=True)` loads it without prunekit, with "
                        "the model code saved beside the weights (`modeling_shrunk.py`: the family's own class, "
                        "resized layer by layer); " if saving.get("remote_code") else
                        "Plain `from_pretrained` **cannot** load this directory; ")
                     + "`prunekit.load(DIR)` rebuilds it from `prunekit_structure.json`.")
    lines.append("")
    if report["onnx"]:
        lines += [f"ONNX: `{report['onnx']['file']}`, onnxruntime output differs from PyTorch by at most "
                  f"{report['onnx']['max_abs_difference']:.3g}.", ""]
    if report["recovery"]:
        r = report["recovery"]
        lines += [f"Recovery: {r['objective']} loss, {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']:.0f} s, "
                  f"lr {r['lr']}.", ""]
    if report["depth"]:
        d = report["depth"]
        lines += [f"Depth: removed blocks {d['removed']} of {d['blocks_before']} ({d['criterion']}).", ""]
    if report["width"]:
        width = report["width"]
        notes = width["notes"]
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        search = width.get("search")
        if search:
            seconds = search["seconds"]
            start = search["start_fitness"]
            lines += [f"Width search ({settings['allocation']['name']}): KL to the unpruned model on "
                      f"{search['fitness_tokens'][-1]} calibration tokens "
                      + (f"{start:.5f} at the start, " if start is not None else "")
                      + f"{search['fitness']:.5f} found; {search['evaluations']} candidates measured; unit costs "
                      f"{seconds['unit_costs']:.1f} s, search {seconds['search']:.1f} s (unit costs included). "
                      "The recipe written carries the widths found.", ""]
        lines += ["## Widths", "", markdown_table(["family", "units", "kept"],
                                                   [(k, v[0], v[1]) for k, v in width["plan"]["widths"].items()]), ""]
    protocol = report["protocol"]
    lines += ["## Data protocol", "",
              f"- calibration: {protocol['calibration']}, {protocol['calibration_split']}; {protocol['calibration_windows']}",
              f"- test: {protocol['test']}, {protocol['test_split']}; {protocol['test_protocol']}", "",
              f"Environment: {json.dumps(report['environment'])}", ""]
    return "\n".join(lines)


class ShrinkGraphJob(Job[ShrinkGraphRecipe]):
    """What structural pruning could remove from a model: every family of coupled units, and what one unit costs."""

    command = "shrink-graph"
    recipe_type = ShrinkGraphRecipe

    def run(self) -> Outcome:
        recipe = self.recipe
        loaded = load_model(recipe.model, kind=(CAUSAL_LM, ENCODER), tokenizer=False,
                            trust_remote_code=recipe.trust_remote_code)
        graph = build_graph(loaded.model, _example_inputs(loaded.kind),
                            adapter=adapter_for(loaded.model, blocks=recipe.blocks),
                            head_mode=recipe.heads, strict=not recipe.lenient)
        base = graph.parameter_count()
        families = graph.summary()
        for family, summary in zip(graph.families, families):
            summary["one_unit_removes"] = base - graph.parameter_count({family.name: 1})
        report = {"model": {"name": loaded.name, "path": str(loaded.path) if loaded.path else None,
                            "kind": loaded.kind},
                  "settings": recipe.model_dump(mode="json"), "families": families, "notes": graph.frozen,
                  "parameters": base}
        return Outcome(report, graph_markdown(report), [], f"{loaded.name}: {len(families)} prunable families, "
                                                            f"{base:,} parameters")


def graph_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """family, kind, units, exact, what one unit removes: one row per family."""
    return [(f["name"], f["kind"], f"{f['units']} {f['unit']}s", "yes" if f["exact"] else "no",
             f"{f['one_unit_removes']:,} parameters") for f in report["families"]]


def graph_markdown(report: dict) -> str:
    lines = [f"# prunekit shrink-graph: {report['model']['name']}", "",
             f"{len(report['families'])} prunable families, {report['parameters']:,} parameters "
             f"(heads mode {report['settings']['heads']}).", "",
             markdown_table(["family", "kind", "units", "exact", "one unit removes"], graph_rows(report)), ""]
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


__all__ = ["ShrinkGraphJob", "ShrinkJob", "ShrinkRun", "build_report", "embedding_fidelity", "graph_markdown",
           "report_markdown", "summary_rows"]
