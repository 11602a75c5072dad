"""The main job (``prunekit prune``): load a model, prune it, evaluate it, and write the model, its compressed
copy and a report; and ``prunekit sweep`` and ``prunekit eval`` beside it. All three are ``Job``s."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from prunekit.core.distributed import ProcessGroup, from_environment
from prunekit.core.masks import sparsity_of
from prunekit.core.progress import set_enabled, status
from prunekit.core.text import TextProtocol, calibration_windows, test_windows
from prunekit.evaluate.perplexity import PerplexityResult, cached_perplexity, perplexity, streamed_perplexity
from prunekit.evaluate.plots import plot_curves, plot_layer_sparsity, plot_unit_ratios
from prunekit.evaluate.tasks import TaskSettings, evaluate_tasks, task_rows
from prunekit.core.config import RecipeModel
from prunekit.core.job import Job, Outcome
from prunekit.evaluate.measure import count_parameters, unique_parameters
from prunekit.evaluate.outcome import write_outcome
from prunekit.evaluate.report import SPEED_NOTE, environment, human_bytes, markdown_table
from prunekit.evaluate.resources import Measured, process_peak_rss
from prunekit.io.atomic import check_output_dir, directory_size
from prunekit.io.digest import directory_digest
from prunekit.io.checkpoint import COMPRESSED_SUBDIR, COMPRESSED_WEIGHTS, write_compressed, write_dense
from prunekit.io import sparse_format
from prunekit.io.checkpoint import unique_state_dict
from prunekit.io.compressed_tensors_format import FORMAT_NAME as COMPRESSED_TENSORS
from prunekit.io.compressed_tensors_format import WEIGHTS_FILE as CT_WEIGHTS
from prunekit.io.compressed_tensors_format import sparsity_layout, stored_bytes, write_compressed_tensors
from prunekit.io.sparse_format import manifest_size_without_codec
from prunekit.models.base import adapter_for
from prunekit.io.shards import ShardedCheckpoint, model_tensor_bytes, saved_model_bytes
from prunekit.models.loading import CAUSAL_LM, LoadedModel, load_model, resolve_model_dir
from prunekit.errors import PrunekitError
from prunekit.weights.pipeline import PruneResult, check_finite_weights, prune_weights
from prunekit.weights.recipe import WeightPruningRecipe
from prunekit.weights.search import SearchResult, needs_search, search_levels, with_levels
from prunekit.weights.streaming import StreamOutput, StreamResult, prune_streaming


def model_sparsity(model: torch.nn.Module) -> float:
    total = zeros = 0
    for parameter in unique_parameters(model):
        total += parameter.numel()
        zeros += parameter.numel() - int(torch.count_nonzero(parameter))
    return zeros / max(total, 1)


def _load(recipe: WeightPruningRecipe) -> LoadedModel:
    loaded = load_model(recipe.model, kind=CAUSAL_LM, dtype=recipe.dtype, device=recipe.device,
                        trust_remote_code=recipe.trust_remote_code)
    loaded.require_tokenizer()
    check_finite_weights(loaded.model)
    return loaded


def _windows(tokenizer, protocol: TextProtocol, calibrate: bool, evaluate: bool, vocab_size: int | None):
    calibration = calibration_windows(tokenizer, protocol) if calibrate else None
    test = test_windows(tokenizer, protocol) if evaluate else None
    for windows in (calibration, test):
        if windows is not None and vocab_size is not None and int(windows.max()) >= vocab_size:
            raise PrunekitError(f"the tokenizer produces token id {int(windows.max())}, but the model's vocabulary "
                                f"has {vocab_size} entries; the tokenizer does not belong to this model")
    return calibration, test


def _vocab_size(model: torch.nn.Module) -> int | None:
    getter = getattr(model, "get_input_embeddings", None)
    return getattr(getter() if callable(getter) else None, "num_embeddings", None)


def _needs_calibration(recipe: WeightPruningRecipe) -> bool:
    from prunekit.core.allocation import get_allocation
    from prunekit.weights.base import get_method

    return (get_method(recipe.method).needs_calibration or "activations" in get_allocation(recipe.allocation).needs
            or recipe.lowrank.enabled or needs_search(recipe))


def _search(loaded: LoadedModel, recipe: WeightPruningRecipe, calibration: torch.Tensor | None,
            group: ProcessGroup | None = None) -> SearchResult | None:
    """A measured allocation's search (``weights.search``), when the recipe does not carry its levels yet."""
    if not needs_search(recipe):
        return None
    if group is not None:
        raise PrunekitError(f"allocation {recipe.allocation['name']} searches in one process; run it without "
                            "torchrun, then prune with the recipe it writes")
    digest = f"{directory_digest(loaded.path)}:{recipe.dtype}" if loaded.path else None
    return search_levels(loaded.model, recipe.pruning(), calibration, model_digest=digest)


def _prune(loaded: LoadedModel, recipe: WeightPruningRecipe, calibration: torch.Tensor | None,
           group: ProcessGroup | None = None) -> tuple[PruneResult, WeightPruningRecipe, SearchResult | None]:
    """Prune as the recipe says; a measured allocation searches first, and the recipe returned carries the
    levels it found (so the recipe written reproduces the model without searching)."""
    if group is not None and calibration is not None:
        calibration = group.share(calibration)
    search = _search(loaded, recipe, calibration, group)
    if search is not None:
        recipe = recipe.model_copy(update={"allocation": with_levels(recipe, search.levels)})
    result = prune_weights(loaded.model, recipe.pruning(), calibration=calibration,
                           reduce=group.reduce_statistics if group is not None else None)
    if search is not None:
        result.allocation_seconds += search.seconds["total"]
    return result, recipe, search


def _dense_perplexity(measure, model_path, test: torch.Tensor, recipe: WeightPruningRecipe, how: str,
                      group: ProcessGroup | None = None) -> PerplexityResult:
    """The unpruned model's perplexity, from the user cache when an earlier run measured the same model files
    on the same windows with the same settings; a run split across processes always measures it."""
    settings = {"dtype": recipe.dtype, "device": torch.device(recipe.device).type, "batch_size": recipe.batch_size,
                "trust_remote_code": recipe.trust_remote_code, "computed": how}
    return cached_perplexity(measure, model_path if group is None else None, test, settings)


def _model_info(name: str, path, adapter_description: dict, parameters: int, dtype: str) -> dict:
    return {"name": name, "path": str(path) if path else None, "family": adapter_description,
            "parameters": parameters, "dtype": dtype}


def prune_job(recipe: WeightPruningRecipe, resume: bool = False) -> Job:
    """The job ``prunekit prune`` runs: in memory, or streamed block by block (``stream``, or resuming)."""
    if (recipe.stream or resume) and recipe.tasks.names:
        raise PrunekitError("--tasks scores the model in memory; leave out --stream, or score the output afterwards "
                            "with prunekit eval OUT --tasks ...")
    if (recipe.stream or resume) and recipe.save_compressed and recipe.format == COMPRESSED_TENSORS:
        raise PrunekitError("--stream writes its compressed copy in prunekit's format only; for compressed-tensors "
                            "prune in memory (no --stream), or add --no-compressed")
    if (recipe.stream or resume) and needs_search(recipe):
        raise PrunekitError(f"allocation {recipe.allocation['name']} searches with the model in memory; run it "
                            "without --stream, then prune --stream --recipe OUT/recipe.yaml (which carries the "
                            "levels found)")
    return StreamedPruneJob(recipe, resume) if (recipe.stream or resume) else PruneJob(recipe)


class PruneJob(Job[WeightPruningRecipe]):
    """Prune in memory; under ``torchrun`` calibration is split across processes and process 0 writes."""

    command = "prune"
    recipe_type = WeightPruningRecipe

    def __init__(self, recipe: WeightPruningRecipe):
        super().__init__(recipe)
        self.group = from_environment(recipe.device)
        self.writer = self.group is None or self.group.is_writer
        if not self.writer:
            set_enabled(False)


    def expected_bytes(self):
        recipe = self.recipe
        return lambda: saved_model_bytes(model_tensor_bytes(resolve_model_dir(recipe.model)[1], recipe.dtype),
                                         recipe.save_dense, recipe.save_compressed)

    def run(self) -> Outcome:
        recipe, group = self.recipe, self.group
        torch.manual_seed(recipe.data.seed)
        protocol = recipe.data.protocol()
        loaded = self.loaded = _load(recipe)
        # Recipes are checked before the (slow) data and pruning steps, against the loaded model.
        calibration, test = _windows(loaded.tokenizer, protocol, _needs_calibration(recipe), recipe.evaluate,
                                     _vocab_size(loaded.model))
        before = None
        if test is not None:
            before = _dense_perplexity(lambda: perplexity(loaded.model, test, recipe.batch_size, "Perplexity before",
                                                          group), loaded.path, test, recipe, "in memory", group)
        tasks = recipe.tasks.protocol(recipe.data.split) if recipe.tasks.names and self.writer else None
        tasks_before = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, "Tasks before") if tasks else None
        with Measured() as measured:
            result, recipe, search = _prune(loaded, recipe, calibration, group)
        self.result, self.search, self.recipe = result, search, recipe
        after = perplexity(loaded.model, test, recipe.batch_size, "Perplexity after", group) if test is not None else None
        tasks_after = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, "Tasks after") if tasks else None
        info = _model_info(loaded.name, loaded.path, adapter_for(loaded.model, blocks=recipe.blocks).describe(),
                           count_parameters(loaded.model), recipe.dtype)
        dense_bytes = sum(p.numel() * p.element_size() for p in unique_parameters(loaded.model))
        report = build_report(info, recipe, protocol, result, before, after, measured, {"dense_bytes": dense_bytes},
                              model_sparsity(loaded.model), {"processes": group.world_size if group else 1})
        if tasks:
            report["tasks"] = {"protocol": tasks.describe(), "before": tasks_before, "after": tasks_after}
        if search is not None:
            report["search"] = search_report(search)
        return Outcome(report, report_markdown(report), summary_rows(report), f"prunekit: {loaded.name}")

    def write(self, directory: Path, outcome: Outcome) -> None:
        recipe, loaded = self.recipe, self.loaded
        sizes = {}
        if recipe.save_dense:
            with status("Saving the dense model (loads with from_pretrained)"):
                write_dense(loaded.model, directory, loaded.tokenizer)
            sizes["dense_bytes"] = directory_size(directory, "*.safetensors")
        if recipe.save_compressed:
            sizes.update(_write_compressed_copy(loaded, directory / COMPRESSED_SUBDIR, recipe))
        sizes.setdefault("dense_bytes", outcome.report["size"]["dense_bytes"])
        outcome.report["size"] = _sizes(sizes, recipe.codec)
        outcome.markdown = report_markdown(outcome.report)
        outcome.summary = summary_rows(outcome.report)
        _plot_layers(directory, self.result, loaded.name)
        if self.search is not None:
            _plot_search(directory, self.search, loaded.name)

    def finished(self) -> None:
        if self.group is not None:
            self.group.barrier()  # every process stays until process 0 has written


class StreamedPruneJob(Job[WeightPruningRecipe]):
    """Prune out of core: one block in memory at a time, the output written as it goes, resumable."""

    command = "prune"
    recipe_type = WeightPruningRecipe
    writes_as_it_goes = True

    def __init__(self, recipe: WeightPruningRecipe, resume: bool = False, overwrite: bool = False):
        super().__init__(recipe)
        self.resume, self.overwrite = resume, overwrite
        self.group = from_environment(recipe.device)
        self.writer = self.group is None or self.group.is_writer
        if not self.writer:
            set_enabled(False)

    def run_into(self, out: Path, overwrite: bool) -> Outcome:
        outcome = _run_streamed(self.recipe, out, overwrite, self.resume, self.group)
        if outcome.report:
            outcome.summary = summary_rows(outcome.report)
            outcome.title = f"prunekit: {outcome.report['model']['name']}"
        return outcome


def _write_compressed_copy(loaded: LoadedModel, directory: Path, recipe: WeightPruningRecipe) -> dict:
    """The compressed copy in the recipe's format, its size, and the size of the same weights in the other format
    (encoded one tensor at a time and not written; tensor data only, the safetensors header adds a few KB)."""
    directory.mkdir()
    state, _ = unique_state_dict(loaded.model)
    layout = sparsity_layout(loaded.model)
    if recipe.format == COMPRESSED_TENSORS:
        with status("Saving the compressed model (compressed-tensors, for vLLM and llm-compressor)"):
            write_compressed_tensors(loaded.model, directory, loaded.tokenizer)
        written = (directory / CT_WEIGHTS).stat().st_size
        prunekit_bytes = sum(payload.numel() for tensor in state.values()
                             for payload in sparse_format.encode_tensor(tensor, recipe.codec)[1].values())
        return {"format": COMPRESSED_TENSORS, "compressed_bytes": written,
                "formats": {"prunekit": prunekit_bytes, COMPRESSED_TENSORS: written},
                "compressed_tensors_layout": layout.format}
    with status(f"Saving the compressed model ({recipe.codec})"):
        manifest = write_compressed(loaded.model, directory, loaded.tokenizer, recipe.codec)
    written = (directory / COMPRESSED_WEIGHTS).stat().st_size
    return {"format": "prunekit", "compressed_bytes": written,
            "compressed_without_codec_bytes": manifest_size_without_codec(manifest),
            "formats": {"prunekit": written, COMPRESSED_TENSORS: stored_bytes(state, layout)},
            "compressed_tensors_layout": layout.format}


def _sizes(sizes: dict, codec: str) -> dict:
    if "compressed_bytes" in sizes:
        sizes["codec"] = codec
        sizes["compressed_ratio"] = sizes["compressed_bytes"] / sizes["dense_bytes"]
    return sizes


def write_reports(directory: Path, report: dict, markdown: str, recipe: WeightPruningRecipe) -> None:
    """The files every job writes (``evaluate.outcome.write_outcome``), for a run that writes as it goes."""
    write_outcome(directory, Outcome(report, markdown), Job(recipe))


def _plot_layers(directory: Path, result: PruneResult, name: str) -> None:
    plot_layer_sparsity([l.name for l in result.layers], [l.target_sparsity for l in result.layers],
                        [l.achieved_sparsity for l in result.layers], directory / "sparsity.png",
                        f"{name}: {result.method['name']} {result.pattern}, {result.allocation['name']}")


def checkpoint_sparsity(directory: Path) -> float:
    """Zeros over all stored parameters, read tensor by tensor."""
    checkpoint = ShardedCheckpoint(directory)
    total = zeros = 0
    for name in checkpoint.names():
        tensor = checkpoint.get(name)
        if tensor.is_floating_point():
            total += tensor.numel()
            zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    return zeros / max(total, 1)


def _run_streamed(recipe: WeightPruningRecipe, out: str | Path, overwrite: bool, resume: bool,
                  group: ProcessGroup | None) -> Outcome:
    from prunekit.models.loading import check_kind, load_tokenizer, parse_dtype, resolve
    from prunekit.models.streamed import StreamedModel

    name, model_dir = resolve_model_dir(recipe.model)
    if model_dir is not None:
        check_kind(name, resolve(model_dir).identify(recipe.trust_remote_code), CAUSAL_LM)
    if model_dir is None:
        raise PrunekitError("streaming reads a local model directory; download the model first")
    if recipe.trust_remote_code and recipe.evaluate and _uses_remote_code(model_dir):
        # Streamed perplexity builds the built-in architecture only; it would measure another model.
        raise PrunekitError("--stream cannot measure perplexity of a model that needs --trust-remote-code; "
                            "add --no-eval")
    out_path = Path(out).expanduser().resolve()
    check_output_dir(out_path, overwrite=True, inputs=(str(model_dir),))  # existence is checked by the stream
    torch.manual_seed(recipe.data.seed)
    protocol = recipe.data.protocol()
    tokenizer = load_tokenizer(model_dir, recipe.trust_remote_code)
    if tokenizer is None:
        raise PrunekitError(f"{name} has no tokenizer; save one beside the model (tokenizer.save_pretrained)")
    dtype = parse_dtype(recipe.dtype)
    skeleton = StreamedModel(model_dir, device=recipe.device, dtype=dtype, trust_remote_code=recipe.trust_remote_code,
                             blocks=recipe.blocks)
    info = _model_info(name, model_dir, skeleton.adapter.describe(), count_parameters(skeleton.model),
                       recipe.dtype)
    calibration, test = _windows(tokenizer, protocol, _needs_calibration(recipe), recipe.evaluate,
                                 _vocab_size(skeleton.model))
    del skeleton
    before = None
    if test is not None and not resume and (group is None or group.is_writer):
        before = _dense_perplexity(lambda: streamed_perplexity(model_dir, test, recipe.batch_size, recipe.device,
                                                               "Perplexity before (streamed)"),
                                   model_dir, test, recipe, "streamed", group)
    measured = Measured()
    holder: dict = {}

    def finalize(work: Path, outcome: StreamResult) -> None:
        measured.stop()
        # Without the dense shards the compressed ones are read back (decoded tensor by tensor).
        weights = work if recipe.save_dense else work / COMPRESSED_SUBDIR
        after = (streamed_perplexity(weights, test, recipe.batch_size, recipe.device, "Perplexity after (streamed)")
                 if test is not None else None)
        sizes = _sizes({"dense_bytes": outcome.dense_bytes, "compressed_bytes": outcome.compressed_bytes,
                        "compressed_without_codec_bytes": outcome.compressed_without_codec_bytes}
                       if recipe.save_compressed else {"dense_bytes": outcome.dense_bytes}, recipe.codec)
        extra = {"processes": group.world_size if group else 1, "streamed": True,
                 "block_seconds": outcome.block_seconds, "resumed_from_block": outcome.resumed_from_block}
        report = build_report(info, recipe, protocol, outcome.result, before, after, measured, sizes,
                              checkpoint_sparsity(weights), extra)
        markdown = report_markdown(report)
        write_reports(work, report, markdown, recipe)
        _plot_layers(work, outcome.result, name)
        holder["report"], holder["markdown"] = report, markdown

    with measured:
        output = StreamOutput(recipe.save_dense, recipe.save_compressed, recipe.codec, resume, overwrite)
        outcome = prune_streaming(model_dir, out_path, recipe.pruning(), calibration=calibration, output=output,
                                  device=recipe.device, dtype=dtype, trust_remote_code=recipe.trust_remote_code,
                                  group=group, extra_settings={"protocol": protocol.describe()}, finalize=finalize)
    if outcome.already_finished and (group is None or group.is_writer):
        # Killed after its reports were written: the finished run's own report stands.
        report_path = out_path / "report.json"
        if not report_path.exists():
            raise PrunekitError(f"{out_path} is already finished, but holds no report.json to show")
        holder["report"] = json.loads(report_path.read_text())
        markdown_path = out_path / "report.md"
        holder["markdown"] = markdown_path.read_text() if markdown_path.exists() else ""
    return Outcome(holder.get("report", {}), holder.get("markdown", ""),
                   out_dir=out_path if "report" in holder else None)


def _uses_remote_code(model_dir: Path) -> bool:
    try:
        return "auto_map" in json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def build_report(model_info: dict, recipe: WeightPruningRecipe, protocol: TextProtocol, result: PruneResult,
                 before: PerplexityResult | None, after: PerplexityResult | None, measured: Measured,
                 sizes: dict, sparsity_in_model: float, extra: dict | None = None) -> dict:
    return {
        "model": model_info,
        "method": result.method,
        "pattern": result.pattern,
        "allocation": result.allocation,
        "sequential": result.sequential,
        "sparsity": {"target": result.sparsity, "achieved_in_targets": result.achieved_sparsity,
                     "achieved_in_model": sparsity_in_model,
                     "target_parameters": result.to_dict()["target_parameters"]},
        "layers": [{"name": l.name, "shape": list(l.shape), "block": l.block, "target": l.target_sparsity,
                    "achieved": l.achieved_sparsity} for l in result.layers],
        "protocol": protocol.describe(),
        "perplexity": {"before": before.perplexity if before else None, "after": after.perplexity if after else None,
                       "before_from_cache": bool(before and before.cached)},
        "timing": {"prune_seconds": result.seconds, "allocation_seconds": result.allocation_seconds},
        "memory": {"peak_rss_during_prune_bytes": measured.peak_rss, "process_peak_rss_bytes": process_peak_rss(),
                   "note": "sampled every 20 ms while pruning"},
        "lowrank": result.lowrank,
        "size": sizes,
        "speed_note": SPEED_NOTE,
        "run": extra or {},
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "environment": environment(),
    }


def report_markdown(report: dict) -> str:
    ppl = report["perplexity"]
    size = report["size"]
    method = ", ".join(f"{k}={v}" for k, v in report["method"].items() if k != "name")
    allocation = ", ".join(f"{k}={v}" for k, v in report["allocation"].items() if k not in ("name", "levels")
                           and v is not None)
    rows = [
        ("model", f"{report['model']['name']} ({report['model']['parameters']:,} parameters, {report['model']['dtype']})"),
        ("method", report["method"]["name"] + (f" ({method})" if method else "")),
        ("pattern", report["pattern"]),
        ("allocation", report["allocation"]["name"] + (f" ({allocation})" if allocation else "")),
        ("calibration order", report["sequential"]),
        ("target sparsity", f"{report['sparsity']['target']:.2%}"),
        ("achieved sparsity (targeted layers)", f"{report['sparsity']['achieved_in_targets']:.2%}"),
        ("achieved sparsity (all parameters)", f"{report['sparsity']['achieved_in_model']:.2%}"),
        ("perplexity before", f"{ppl['before']} (from the cache of an earlier run)" if ppl.get("before_from_cache")
                              else ppl["before"]),
        ("perplexity after", ppl["after"]),
        ("prune wall time", f"{report['timing']['prune_seconds']:.1f} s"),
        ("peak RSS during pruning", human_bytes(report["memory"]["peak_rss_during_prune_bytes"])),
        ("dense weights on disk", human_bytes(size["dense_bytes"])),
    ]
    if report.get("lowrank"):
        kind = "ARMOR" if report["lowrank"]["settings"].get("kind") == "armor" else "low-rank correction"
        rows.insert(5, (kind, _lowrank_summary(report["lowrank"])))
    if size.get("compressed_bytes") and size.get("format") == COMPRESSED_TENSORS:
        rows.append(("compressed weights on disk", f"{human_bytes(size['compressed_bytes'])} "
                     f"({size['compressed_ratio']:.1%} of dense; compressed-tensors {size['compressed_tensors_layout']})"))
    elif size.get("compressed_bytes"):
        rows.append(("compressed weights on disk",
                     f"{human_bytes(size['compressed_bytes'])} ({size['compressed_ratio']:.1%} of dense; "
                     f"{human_bytes(size['compressed_without_codec_bytes'])} as bitmask + values before {size['codec']})"))
    if size.get("formats"):
        rows.append(("the two compressed formats", "; ".join(
            f"{name} {human_bytes(value)} ({value / size['dense_bytes']:.1%} of dense"
            + (", written)" if name == size["format"] else ", not written: tensor data only)")
            for name, value in size["formats"].items())))
    protocol = report["protocol"]
    lines = [f"# prunekit report: {report['model']['name']}", "", markdown_table(["", ""], rows), "",
             *_tasks_markdown(report.get("tasks")),
             *_search_markdown(report.get("search")),
             "## Data protocol", "",
             f"- calibration: {protocol['calibration']}, {protocol['calibration_split']}; {protocol['calibration_windows']}",
             f"- test: {protocol['test']}, {protocol['test_split']}; {protocol['test_protocol']}", "",
             "## Speed", "", report["speed_note"], "", "## Per-layer sparsity", "",
             markdown_table(["layer", "shape", "allocated", "achieved"],
                            [(l["name"], "×".join(map(str, l["shape"])), f"{l['target']:.4f}", f"{l['achieved']:.4f}")
                             for l in report["layers"]]), "",
             f"Environment: {json.dumps(report['environment'])}", ""]
    return "\n".join(lines)


def search_report(search: SearchResult) -> dict:
    """The search's part of a report; the levels per layer are in the recipe and the layer table already."""
    return {k: v for k, v in search.to_dict().items() if k != "levels"}


def _search_markdown(search: dict | None) -> list[str]:
    if not search:
        return []
    seconds = search["seconds"]
    rows = [("allocation", f"{search['allocation']['name']} over {search['database']['units']} units "
                           f"({search['allocation']['unit']}), levels {search['database']['levels'][0]:g}.."
                           f"{search['database']['levels'][-1]:g}"),
            ("ratio", f"target {search['ratio']:.4f}, allocated {search['achieved_ratio']:.4f}"
                      + ("" if search["budget_exact"] else " (the grid cannot meet the target exactly)")),
            ("fitness tokens", ", ".join(str(t) for t in search["fitness_tokens"]) or "–")]
    if search["predicted_cost"] is not None:
        rows.append(("knapsack: summed unit costs", f"{search['predicted_cost']:.5f}"))
    if search["fitness"] is not None:
        rows.append(("fitness (KL to dense, last stage)", f"{search['start_fitness']:.5f} at the start → "
                                                          f"{search['fitness']:.5f} ({search['evaluations']} "
                                                          "candidates measured)"))
    database = search["database"]
    stream = database.get("stream", "dense")
    rows += [("level database", f"{database['path']} ("
                                + ("reused" if database["reused"] else f"{database['blocks_built']} blocks built")
                                + f", {human_bytes(database['bytes'])})"),
             ("database stream", "the dense model's inputs" if stream == "dense" else
              f"{stream}: every earlier layer pruned at {database.get('reference_ratio', 0):g} "
              f"({database.get('sequential', 'layer')} order)")]
    check = search.get("sequential_check")
    if check:
        kept = "the found levels" if check["kept"] == "found" else f"the start ({check['start']})"
        rows.append(("sequential check", f"pruned as prune prunes, on {check['tokens']} tokens: start "
                                         f"({check['start']}) {check['start_kl']:.5f}, found {check['found_kl']:.5f}; "
                                         f"kept {kept}"))
    rows += [("wall time", f"database {seconds['database']:.1f} s, unit costs {seconds['unit_costs']:.1f} s, "
                           f"search {seconds['search']:.1f} s (costs included)"
                           + (f", sequential check {seconds['sequential_check']:.1f} s"
                              if seconds.get("sequential_check") else "")),
             ("peak RSS during the search", human_bytes(search["peak_rss_bytes"]))]
    units = [(u["name"], f"{u['parameters']:,}", f"{u['ratio']:.2f}",
              "–" if u["start_ratio"] is None else f"{u['start_ratio']:.2f}",
              "–" if u["cost"] is None else f"{u['cost']:.5f}") for u in search["units"]]
    return ["## Allocation by search", "", markdown_table(["", ""], rows), "",
            "![ratio per unit](allocation.png)", "",
            *(["![search curve](search.png)", ""] if search["curve"] else []),
            markdown_table(["unit", "parameters", "ratio", "start", "cost alone at its ratio"], units), ""]


def _plot_search(directory: Path, search: SearchResult, name: str) -> None:
    plot_unit_ratios([u["name"] for u in search.units], [u["ratio"] for u in search.units],
                     [u["start_ratio"] for u in search.units] if search.units and search.units[0]["start_ratio"]
                     is not None else None, directory / "allocation.png",
                     f"{name}: {search.allocation['name']} allocation at {search.ratio:.0%}")
    if search.curve:
        plot_curves({"best fitness": ([p["evaluations"] for p in search.curve], [p["fitness"] for p in search.curve])},
                    directory / "search.png", "candidates measured", "KL(dense ‖ pruned) on calibration tokens",
                    f"{name}: evolutionary search")


def _lowrank_summary(lowrank: dict) -> str:
    settings = lowrank["settings"]
    how = ("ARMOR's block-diagonal factors" if settings.get("kind") == "armor"
           else f"{settings['allocation']} allocation" + (", kept values refit" if settings.get("refit") else ""))
    return (f"{lowrank['extra_parameters']:,} extra parameters ({lowrank['extra_fraction']:.1%} of the targeted "
            f"layers; {how}), {lowrank['layers_corrected']} layers; mean "
            f"relative layer error {lowrank['mean_relative_error_before']:.4f} → {lowrank['mean_relative_error_after']:.4f}")


def _tasks_markdown(tasks: dict | None, column: str = "accuracy ± standard error (before → after)") -> list[str]:
    if not tasks:
        return []
    protocol = tasks["protocol"]
    definitions = [f"- `{name}`: {text}" for name, text in protocol["definitions"].items()]
    return ["## Zero-shot tasks", "",
            markdown_table(["task", column],
                           task_rows(tasks.get("before"), tasks.get("after"))), "",
            f"{protocol['examples']} examples per task from the {protocol['source']}, seed {protocol['seed']}, "
            f"0-shot, scored by {protocol['harness']} on the in-memory model:", "", *definitions, ""]


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """The terminal's summary of a prune report."""
    ppl, size = report["perplexity"], report["size"]
    rows = [("method", f"{report['method']['name']} · {report['pattern']} · {report['allocation']['name']}"),
            ("ratio", f"target {report['sparsity']['target']:.2%}, achieved {report['sparsity']['achieved_in_targets']:.2%} "
                      f"of targeted weights ({report['sparsity']['achieved_in_model']:.2%} of all)")]
    if report.get("lowrank"):
        rows.append(("low-rank", _lowrank_summary(report["lowrank"])))
    if ppl["before"] is not None:
        rows.append(("perplexity", f"{ppl['before']:.3f} → {ppl['after']:.3f}"
                                   + (" (before: from the cache)" if ppl.get("before_from_cache") else "")))
    run = report.get("run", {})
    rows.append(("prune time", f"{report['timing']['prune_seconds']:.1f} s"
                 + (f" ({run['processes']} processes)" if run.get("processes", 1) > 1 else "")
                 + (" (streamed)" if run.get("streamed") else "")))
    rows.append(("peak RSS (pruning)", f"{report['memory']['peak_rss_during_prune_bytes'] / 2**20:.0f} MiB"))
    if report.get("tasks"):
        rows.extend(task_rows(report["tasks"].get("before"), report["tasks"].get("after")))
    if size.get("compressed_bytes"):
        rows.append(("size on disk", f"dense {size['dense_bytes'] / 2**20:.1f} MiB → compressed "
                                     f"{size['compressed_bytes'] / 2**20:.1f} MiB ({size['compressed_ratio']:.1%})"
                                     + (f", {size['format']}" if size.get("format") else "")))
        for name, value in (size.get("formats") or {}).items():
            if name != size.get("format"):
                rows.append((f"as {name}", f"{value / 2**20:.1f} MiB ({value / size['dense_bytes']:.1%}; not written)"))
    if report.get("unreached_experts"):
        rows.append(("experts", f"{len(report['unreached_experts'])} no calibration token reached, pruned by magnitude"))
    rows.append(("protocol", f"calibration {report['protocol']['calibration_windows']}; "
                             f"test {report['protocol']['test_protocol']}"))
    rows.append(("note", "masks do not speed up dense CPU kernels (see report.md)"))
    return rows


class SweepRecipe(WeightPruningRecipe):
    """``prunekit sweep``: the prune settings, at several ratios."""

    ratios: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.6, 0.7], min_length=1)


class SweepJob(Job[SweepRecipe]):
    """Prune the same model at several ratios (restoring it in between) and plot perplexity against them."""

    command = "sweep"
    recipe_type = SweepRecipe

    def run(self) -> Outcome:
        recipe = self.recipe
        if recipe.tasks.names:
            raise PrunekitError("sweep measures perplexity only; score tasks with prunekit prune or eval --tasks")
        protocol = recipe.data.protocol()
        loaded = _load(recipe)
        calibration, test = _windows(loaded.tokenizer, protocol, _needs_calibration(recipe), True,
                                     _vocab_size(loaded.model))
        pristine = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        dense = _dense_perplexity(lambda: perplexity(loaded.model, test, recipe.batch_size, "Perplexity dense"),
                                  loaded.path, test, recipe, "in memory")
        points = []
        for value in recipe.ratios:
            loaded.model.load_state_dict(pristine)
            step = WeightPruningRecipe.model_validate({**recipe.model_dump(exclude={"ratios"}), "ratio": value})
            with Measured() as measured:
                result, _, _ = _prune(loaded, step, calibration)
            after = perplexity(loaded.model, test, recipe.batch_size, f"Perplexity at {value:.0%}")
            points.append({"ratio": value, "achieved": result.achieved_sparsity, "perplexity": after.perplexity,
                           "prune_seconds": measured.seconds})
        self.name, self.dense = loaded.name, dense.perplexity
        report = {"model": loaded.name, "method": recipe.method, "pattern": recipe.pattern,
                  "allocation": recipe.allocation, "dense_perplexity": dense.perplexity,
                  "dense_perplexity_from_cache": dense.cached, "points": points,
                  "protocol": protocol.describe(), "environment": environment()}
        table = markdown_table(["ratio", "achieved", "perplexity", "prune s"],
                               [(f"{p['ratio']:.0%}", f"{p['achieved']:.4f}", p["perplexity"],
                                 f"{p['prune_seconds']:.1f}") for p in points])
        markdown = (f"# Ratio sweep: {loaded.name}, {recipe.method['name']} ({recipe.allocation['name']})\n\n"
                    f"Dense perplexity: {dense.perplexity:.4g}"
                    f"{' (from the cache of an earlier run)' if dense.cached else ''}\n\n"
                    f"{table}\n\nProtocol: {protocol.summary()}\n"
                    "\n![perplexity against the ratio](sweep.png)\n")
        summary = [(f"{p['ratio']:.0%}", f"perplexity {p['perplexity']:.4g} (dense {dense.perplexity:.4g})")
                   for p in points]
        return Outcome(report, markdown, summary, f"prunekit sweep: {loaded.name}")

    def write(self, directory: Path, outcome: Outcome) -> None:
        points = outcome.report["points"]
        plot_curves({self.recipe.method["name"]: ([p["ratio"] * 100 for p in points],
                                                  [p["perplexity"] for p in points])},
                    directory / "sweep.png", "ratio removed (%)", "perplexity (log scale)",
                    f"{self.name}: perplexity against the ratio", log_y=True, reference=("dense", self.dense))


class EvalRecipe(RecipeModel):
    """``prunekit eval``: perplexity of a causal language model on the pinned text protocol's test part."""

    model: str | None = Field(None, description="model directory, a pruned output or its compressed/ copy")
    test: str = "wiki"
    test_windows: int = Field(40, ge=1)
    seq_len: int = Field(512, ge=2)
    text_field: str = "text"
    batch_size: int = Field(4, ge=1)
    blocks: str | None = None
    tasks: TaskSettings = Field(default_factory=TaskSettings)

    def protocol(self) -> TextProtocol:
        return TextProtocol(test=self.test, test_windows=self.test_windows, seq_len=self.seq_len,
                            text_field=self.text_field)


class EvalJob(Job[EvalRecipe]):
    command = "eval"
    recipe_type = EvalRecipe

    def run(self) -> Outcome:
        recipe = self.recipe
        protocol = recipe.protocol()
        loaded = load_model(recipe.model, kind=CAUSAL_LM)
        loaded.require_tokenizer()
        _, windows = _windows(loaded.tokenizer, protocol, False, True, _vocab_size(loaded.model))
        result = perplexity(loaded.model, windows, recipe.batch_size)
        described = protocol.describe()
        report = {"model": loaded.name, "perplexity": result.perplexity, "mean_loss": result.mean_loss,
                  "sparsity": model_sparsity(loaded.model), "windows": result.windows, "seq_len": result.seq_len,
                  "test": described["test_split"], "protocol": described["test_protocol"],
                  "environment": environment()}
        rows = [(key, f"{value:.4f}" if isinstance(value, float) else str(value))
                for key, value in report.items() if key != "environment"]
        tasks = None
        if recipe.tasks.names:
            tasks_protocol = recipe.tasks.protocol()
            tasks = {"protocol": tasks_protocol.describe(),
                     "after": evaluate_tasks(loaded.model, loaded.tokenizer, tasks_protocol)}
            report["tasks"] = tasks
        markdown = (f"# Perplexity of {loaded.name}\n\n" + markdown_table(["", ""], rows) + "\n\n"
                    + "\n".join(_tasks_markdown(tasks, "accuracy ± standard error"))
                    + f"\nEnvironment: {json.dumps(report['environment'])}\n")
        summary = rows + (task_rows(None, tasks["after"]) if tasks else [])
        return Outcome(report, markdown, summary, f"perplexity of {loaded.name}")


def sparsity_by_layer(model: torch.nn.Module) -> dict[str, float]:
    return {name: sparsity_of(p.detach()) for name, p in model.named_parameters() if p.dim() == 2}
