"""The ``prunekit shrink`` job: load a Hugging Face model, measure it, remove blocks and/or widths,
optionally recover, measure again, and write the smaller model with its report.

Causal language models are judged by perplexity on the pinned text protocol; encoders (BERT,
all-MiniLM-L6-v2) by embedding fidelity, the mean cosine similarity between the shrunk and the
unpruned model's mean-pooled embeddings of the test windows.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.progress import status
from prunekit.core.text import TextProtocol, calibration_windows, random_windows, source_text, test_windows, tokenize
from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import perplexity, window_losses
from prunekit.evaluate.report import environment, human_bytes, markdown_table, write_json
from prunekit.evaluate.resources import Measured
from prunekit.io.atomic import atomic_directory, check_output_dir
from prunekit.io.shards import model_tensor_bytes
from prunekit.models.base import ModelAdapter, adapter_for
from prunekit.models.loading import CAUSAL_LM, ENCODER, LoadedModel, load_model, resolve_model_dir
from prunekit.structure.depth import prune_depth
from prunekit.structure.measure import Measurement, SpeedProtocol, compare, lm_inputs, measure_side_by_side
from prunekit.structure.peak_memory import describe as describe_memory
from prunekit.structure.graph import build_graph
from prunekit.structure.importance import get_importance
from prunekit.structure.pipeline import check_plan, encoder_calibration, lm_calibration, lm_example_inputs, prune_structure
from prunekit.structure.recipe import ShrinkRecipe
from prunekit.structure.recovery import recover_lm
from prunekit.structure.saving import check_onnx, export_onnx, save_structured

ONNX_FILE = "model.onnx"


@dataclass
class ShrinkOutcome:
    report: dict
    out_dir: Path | None
    markdown: str = ""
    extra: dict = field(default_factory=dict)


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


def _speeds(loaded: LoadedModel, original: nn.Module, recipe: ShrinkRecipe) -> tuple[Measurement, Measurement]:
    """Speed of the original and of the shrunk model, timed side by side."""
    protocol = SpeedProtocol(tuple(recipe.measure.batch_sizes), recipe.measure.runs, recipe.measure.warmup,
                             recipe.measure.threads, recipe.measure.seq_len)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    make = lm_inputs(recipe.measure.seq_len, vocab, recipe.data.seed)
    if loaded.kind == "encoder":
        inner = make
        make = lambda batch: {"input_ids": inner(batch)["input_ids"]}  # noqa: E731 - encoders take no cache flag
    speeds = measure_side_by_side({"before": original, "after": loaded.model}, make, recipe.measure.seq_len, protocol,
                                  unit="tokens", memory=recipe.measure.memory)
    return speeds["before"], speeds["after"]


def _quality(loaded: LoadedModel, test: torch.Tensor | None, reference: torch.Tensor | None, recipe: ShrinkRecipe,
             label: str) -> float | None:
    if test is None:
        return None
    if loaded.kind == "causal-lm":
        return perplexity(loaded.model, test, recipe.batch_size, f"Perplexity {label}").perplexity
    return embedding_fidelity(reference, loaded.model, test, recipe.batch_size)


def _encoder_windows(tokenizer, protocol: TextProtocol, part: str) -> torch.Tensor:
    text = source_text(protocol.calibration if part == "calibration" else protocol.test, part, protocol)
    tokens = tokenize(tokenizer, text)
    if part == "calibration":
        return random_windows(tokens, protocol.calibration_samples, protocol.seq_len, protocol.seed)
    from prunekit.core.text import consecutive_windows

    return consecutive_windows(tokens, protocol.test_windows, protocol.seq_len)


def run_shrink_job(recipe: ShrinkRecipe, out: str | Path, overwrite: bool = False) -> ShrinkOutcome:
    # The shrunk model is at most the original's size (once more as model.onnx with --onnx).
    out_path = check_output_dir(out, overwrite, inputs=(recipe.model,), expected_bytes=lambda: (1 + recipe.onnx) *
                                model_tensor_bytes(resolve_model_dir(recipe.model)[1], recipe.dtype))
    torch.manual_seed(recipe.data.seed)
    protocol = recipe.data.protocol()
    loaded = load_model(recipe.model, kind=(CAUSAL_LM, ENCODER), dtype=recipe.dtype,
                        trust_remote_code=recipe.trust_remote_code)
    loaded.require_tokenizer()
    adapter = adapter_for(loaded.model)
    if recipe.importance is None:  # resolved here so that the report and recipe.yaml name it
        default = "fisher" if loaded.kind == "causal-lm" else "flap"
        recipe = recipe.model_copy(update={"importance": get_importance(default).settings()})
    if loaded.kind == "encoder" and recipe.recovery is not None:
        raise PrunekitError("recovery fine-tuning is implemented for causal language models and classifiers, "
                            "not for encoders without a training objective")
    if loaded.kind == "encoder" and recipe.depth.blocks and recipe.depth.criterion == "perplexity":
        raise PrunekitError("the perplexity depth criterion needs a causal language model; use influence")
    if loaded.kind == "encoder":
        max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
        if max_positions and protocol.seq_len > max_positions:
            raise PrunekitError(f"--seq-len {protocol.seq_len} exceeds the encoder's {max_positions} positions")
    started_all = time.perf_counter()
    example = lm_example_inputs() if loaded.kind == "causal-lm" else {"input_ids": torch.arange(1, 5).unsqueeze(0)}
    graph = None
    if recipe.depth.blocks:
        prune_depth_check(loaded, adapter, recipe)
    if recipe.ratio > 0 and not recipe.depth.blocks:
        # Checked before the slow steps; reused for pruning since the model is unchanged until then.
        graph = build_graph(loaded.model, example, adapter=adapter, head_mode=recipe.heads, strict=not recipe.lenient)
        check_plan(graph, recipe.ratio, recipe.granularity, recipe.target, recipe.allocation, recipe.ignore,
                   recipe.overrides)
    if loaded.kind == "causal-lm":
        calibration = calibration_windows(loaded.tokenizer, protocol)
        test = test_windows(loaded.tokenizer, protocol) if recipe.evaluate else None
    else:
        calibration = _encoder_windows(loaded.tokenizer, protocol, "calibration")
        test = _encoder_windows(loaded.tokenizer, protocol, "test") if recipe.evaluate else None
    reference = _mean_pooled(loaded.model, test, recipe.batch_size) if (loaded.kind == "encoder" and test is not None) else None
    parameters_before = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    quality_before = _quality(loaded, test, reference, recipe, "before")
    # The unpruned copy is the distillation teacher and the speed reference timed next to the shrunk model.
    original = copy.deepcopy(loaded.model)

    depth_result = None
    width_result = None
    with Measured() as pruning:
        if recipe.depth.blocks:
            depth_result = _depth(loaded, adapter, recipe, calibration)
        if recipe.ratio > 0:
            adapter = adapter_for(loaded.model)
            make_calibration = lm_calibration if loaded.kind == "causal-lm" else encoder_calibration
            width_result = prune_structure(
                loaded.model, recipe.ratio, example_inputs=example, importance=recipe.importance,
                granularity=recipe.granularity, target=recipe.target, allocation=recipe.allocation,
                head_mode=recipe.heads, ignore=recipe.ignore, overrides=recipe.overrides,
                calibration=make_calibration(calibration, recipe.batch_size), adapter=adapter, seed=recipe.data.seed,
                strict=not recipe.lenient, graph=graph, reconstruct=recipe.reconstruct,
                damping=recipe.reconstruct_damping)
    quality_pruned = _quality(loaded, test, reference, recipe, "after pruning")
    recovery_result = None
    quality_recovered = None
    if recipe.recovery is not None:
        settings = recipe.recovery
        train_text = tokenize(loaded.tokenizer, source_text(protocol.calibration, "calibration", protocol))
        train = random_windows(train_text, settings.samples, protocol.seq_len, protocol.seed + 1)
        teacher = original if settings.mode == "distill" else None
        recovery_result = recover_lm(loaded.model, train, teacher, settings.mode, settings.seconds, settings.steps,
                                     settings.lr, settings.batch_size, settings.temperature, seed=recipe.data.seed,
                                     train_embeddings=settings.train_embeddings,
                                     train_only=tuple(settings.train_only))
        quality_recovered = _quality(loaded, test, reference, recipe, "after recovery")
    speed_before, speed_after = _speeds(loaded, original, recipe)
    del original

    with atomic_directory(out_path, overwrite) as tmp:
        blocks = {depth_result.path: [i for i in range(depth_result.blocks_before) if i not in depth_result.removed]} \
            if depth_result else None
        with status("Saving the shrunk model"):
            saved = save_structured(loaded.model, tmp, loaded.tokenizer, adapter_for(loaded.model), blocks)
        onnx = None
        if recipe.onnx:
            onnx = _export(loaded, tmp)
        report = _report(loaded, recipe, protocol, parameters_before, quality_before, quality_pruned,
                         quality_recovered, speed_before, speed_after, depth_result, width_result, recovery_result,
                         saved.to_dict(), _disk_bytes(loaded.path), pruning, onnx, time.perf_counter() - started_all)
        markdown = report_markdown(report)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if width_result is not None:
            _plot_widths(width_result.plan.widths, tmp / "widths.png", loaded.name)
    return ShrinkOutcome(report, out_path, markdown)


def prune_depth_check(loaded: LoadedModel, adapter: ModelAdapter, recipe: ShrinkRecipe) -> None:
    blocks = len(adapter.blocks())
    if recipe.depth.blocks >= blocks:
        raise PrunekitError(f"cannot remove {recipe.depth.blocks} of {blocks} blocks; keep at least one")


def _depth(loaded: LoadedModel, adapter: ModelAdapter, recipe: ShrinkRecipe, calibration: torch.Tensor):
    settings = recipe.depth
    if loaded.kind == "causal-lm":
        batches = lm_calibration(calibration, recipe.batch_size).batches
    else:
        batches = encoder_calibration(calibration, recipe.batch_size).batches
    evaluate = None
    if settings.criterion == "perplexity":
        windows = calibration[:settings.windows]

        def evaluate(model: nn.Module) -> float:
            losses = window_losses(model, windows, recipe.batch_size, "Perplexity")
            return sum(losses) / len(losses)
    return prune_depth(loaded.model, adapter.blocks_path, settings.blocks, settings.criterion, batches, evaluate)


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


def _report(loaded, recipe, protocol, parameters_before, quality_before, quality_pruned, quality_recovered,
            speed_before, speed_after, depth_result, width_result, recovery_result, saved, size_before, pruning,
            onnx, total_seconds) -> dict:
    quality_name = "perplexity" if loaded.kind == "causal-lm" else "embedding cosine to the unpruned model"
    if loaded.kind == "encoder" and quality_before is not None:
        quality_before = 1.0
    return {
        "model": {"name": loaded.name, "path": str(loaded.path) if loaded.path else None, "kind": loaded.kind,
                  "family": adapter_for(loaded.model).describe(), "dtype": recipe.dtype},
        "settings": recipe.model_dump(mode="json", by_alias=True),
        "parameters": {"before": parameters_before, "after": speed_after.parameters,
                       "removed_fraction": 1 - speed_after.parameters / parameters_before},
        "quality": {"metric": quality_name, "before": quality_before, "after_pruning": quality_pruned,
                    "after_recovery": quality_recovered},
        "speed": {"protocol": SpeedProtocol(tuple(recipe.measure.batch_sizes), recipe.measure.runs,
                                            recipe.measure.warmup, recipe.measure.threads,
                                            recipe.measure.seq_len).describe()
                  + "; the original and the shrunk model timed side by side, their passes alternating",
                  "before": speed_before.to_dict(), "after": speed_after.to_dict(),
                  "ratios": compare(speed_before, speed_after)},
        "size": {"before_bytes": size_before, "after_bytes": saved["weights_bytes"]},
        "depth": depth_result.to_dict() if depth_result else None,
        "width": width_result.to_dict() if width_result else None,
        "recovery": recovery_result.to_dict() if recovery_result else None,
        "saving": saved,
        "onnx": onnx,
        "timing": {"prune_seconds": pruning.seconds, "total_seconds": total_seconds,
                   **(width_result.seconds if width_result else {})},
        "memory": {"peak_rss_during_prune_bytes": pruning.peak_rss,
                   "inference": {"before": speed_before.memory, "after": speed_after.memory,
                                 "protocol": _memory_protocol(speed_before.memory)}},
        "protocol": protocol.describe(),
        "environment": environment(),
    }


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
    rows.append(("weights on disk", human_bytes(size["before_bytes"]) if size["before_bytes"] else "–",
                 human_bytes(size["after_bytes"]),
                 f"{size['after_bytes'] / size['before_bytes']:.3f}" if size["before_bytes"] else "–"))
    final = quality["after_recovery"] if quality["after_recovery"] is not None else quality["after_pruning"]
    rows.append((quality["metric"], _fmt(quality["before"]), _fmt(final),
                 f"{final / quality['before']:.3f}" if (final is not None and quality["before"]) else "–"))
    settings = report["settings"]
    lines = [f"# prunekit shrink: {report['model']['name']}", "",
             f"Removed {report['parameters']['removed_fraction']:.2%} of the parameters "
             f"({settings['target']} target {settings['ratio']:.0%} by width"
             + (f", {settings['depth']['blocks']} blocks by {settings['depth']['criterion']}" if settings["depth"]["blocks"] else "")
             + f"); importance {settings['importance']['name']}, allocation {settings['allocation']['name']}, "
             f"granularity {', '.join(settings['granularity'])}, heads mode {settings['heads']}.", "",
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
    if saving["from_pretrained"]:
        lines.append("Loading: `AutoModel*.from_pretrained(DIR)` loads this directory (the config describes every "
                     "width); `prunekit.load(DIR)` works too.")
    else:
        lines.append("Loading: plain `from_pretrained` **cannot** load this directory ("
                     + "; ".join(saving["reasons"]) + "). `prunekit.load(DIR)` rebuilds it from "
                     "`prunekit_structure.json`.")
    lines.append("")
    if report["onnx"]:
        lines += [f"ONNX: `{report['onnx']['file']}`, onnxruntime output differs from PyTorch by at most "
                  f"{report['onnx']['max_abs_difference']:.3g}.", ""]
    if report["recovery"]:
        r = report["recovery"]
        lines += [f"Recovery: {r['mode']}, {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']:.0f} s, "
                  f"lr {r['lr']}.", ""]
    if report["depth"]:
        d = report["depth"]
        lines += [f"Depth: removed blocks {d['removed']} of {d['blocks_before']} ({d['criterion']}).", ""]
    if report["width"]:
        width = report["width"]
        notes = width["notes"]
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        lines += ["## Widths", "", markdown_table(["family", "units", "kept"],
                                                   [(k, v[0], v[1]) for k, v in width["plan"]["widths"].items()]), ""]
    protocol = report["protocol"]
    lines += ["## Data protocol", "",
              f"- calibration: {protocol['calibration']}, {protocol['calibration_split']}; {protocol['calibration_windows']}",
              f"- test: {protocol['test']}, {protocol['test_split']}; {protocol['test_protocol']}", "",
              f"Environment: {json.dumps(report['environment'])}", ""]
    return "\n".join(lines)


__all__ = ["ShrinkOutcome", "embedding_fidelity", "report_markdown", "run_shrink_job"]
