"""Out-of-core one-shot pruning: one block in memory at a time, output written as it goes, resumable.

The model is a meta-device skeleton over its memory-mapped safetensors shards. Each block is
loaded, calibrated and pruned exactly as in memory (the same ``SequentialCalibration`` steps),
written as its own output shard, and released. Peak memory is about one block, the calibration
activations and the embeddings, whatever the depth.

Work happens in ``OUT.partial``. After each block the run records, atomically, the block's shard,
the calibration activations and a state file; a run killed at any point and restarted with
``resume=True`` continues after the last completed block and produces the same model. Only a
finished run is renamed to ``OUT``, so partial output is never mistaken for finished output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open

from prunekit.core.calibration import HEAD, BlockInputs, SequentialCalibration, group_by_block
from prunekit.core.distributed import ProcessGroup
from prunekit.core.progress import progress_bar, status
from prunekit.errors import PrunekitError
from prunekit.io.atomic import replace_directory, write_text
from prunekit.io.checkpoint import COMPRESSED_MARKER, write_compressed_shard
from prunekit.io import sparse_format
from prunekit.io.shards import INDEX, shard_name, write_index, write_shard
from prunekit.io.sparse_format import FORMAT_NAME, FORMAT_VERSION, manifest_size_without_codec
from prunekit.models.streamed import StreamedModel
from prunekit.weights.pipeline import (
    LayerResult,
    NormCollector,
    PruneResult,
    Pruner,
    allocate_sparsities,
    describe,
    layer_result,
    plan_pruning,
)

STATE_FILE = "prunekit_run.json"
COMPRESSED_SUBDIR = "compressed"


@dataclass
class StreamResult:
    result: PruneResult
    out_dir: Path
    block_seconds: list[float] = field(default_factory=list)
    dense_bytes: int = 0
    compressed_bytes: int = 0
    compressed_without_codec_bytes: int = 0
    resumed_from_block: int = 0


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _windows_digest(windows: torch.Tensor | None) -> str | None:
    if windows is None:
        return None
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()[:16]


def _save_activations(path: Path, inputs: BlockInputs) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"hidden": inputs.hidden, "args": inputs.args, "kwargs": inputs.kwargs,
                "hidden_as_kwarg": inputs.hidden_as_kwarg}, tmp)
    tmp.replace(path)


def _load_activations(path: Path) -> BlockInputs:
    if not path.exists():
        raise PrunekitError(f"cannot resume: {path.name} is missing from the partial run")
    data = torch.load(path, weights_only=True)
    return BlockInputs(data["hidden"], data["args"], data["kwargs"], data["hidden_as_kwarg"])


def _copy_side_files(source: Path, target: Path) -> None:
    """Config, generation config and tokenizer files: everything but the weights."""
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt", ".gguf")) and item.name != INDEX:
            shutil.copy2(item, target / item.name)


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise PrunekitError(f"not enough disk space for {out}: {needed / 2**30:.2f} GiB needed, "
                            f"{free / 2**30:.2f} GiB free")


def _different_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{key}: {saved.get(key)!r} → {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def prune_streaming(model_dir: str | Path, out: str | Path, *, method: Any = "wanda", sparsity: float | None = 0.5,
                    pattern: str | None = None, allocation: Any = "uniform", calibration: torch.Tensor | None = None,
                    include: Sequence[str] = (), exclude: Sequence[str] = (),
                    overrides: Mapping[str, float] | None = None, sequential: str = "layer", batch_size: int = 4,
                    device: str = "cpu", dtype: torch.dtype | None = None, untie_embeddings: bool = False,
                    save_compressed: bool = True, codec: str = "zstd", resume: bool = False, overwrite: bool = False,
                    group: ProcessGroup | None = None, extra_settings: Mapping[str, Any] | None = None,
                    finalize: Callable[[Path, StreamResult], None] | None = None) -> StreamResult:
    """Prune a safetensors checkpoint block by block into ``out`` (see the module docstring)."""
    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out).expanduser().resolve()
    writer = group is None or group.is_writer
    streamed = StreamedModel(model_dir, device=device, dtype=dtype)
    plan = plan_pruning(streamed.model, method, sparsity, pattern, allocation, include, exclude, untie_embeddings,
                        calibration is not None)
    windows = group.share(calibration) if group is not None and calibration is not None else calibration
    settings = {"model": streamed.checkpoint.fingerprint(), "method": describe(plan.method),
                "pattern": str(plan.pattern), "allocation": describe(plan.allocation), "sparsity": plan.sparsity,
                "include": list(include), "exclude": list(exclude), "overrides": dict(overrides or {}),
                "sequential": sequential, "batch_size": batch_size, "dtype": str(streamed.dtype),
                "untie_embeddings": untie_embeddings, "compressed": save_compressed, "codec": codec,
                "calibration": _windows_digest(calibration), "processes": group.world_size if group else 1,
                **(extra_settings or {})}
    work = partial_dir(out)
    if writer:
        state = _open_work_dir(work, out, settings, resume, overwrite, streamed.checkpoint.size_bytes(),
                               save_compressed)
    if group is not None:
        group.barrier()
        if not writer:  # the writer validated and prepared the work directory
            state = json.loads((work / STATE_FILE).read_text())
    adapter = streamed.adapter
    blocks = adapter.blocks()
    total_shards = len(blocks) + 1
    by_name = {t.name: t for t in plan.targets}

    def weight_of(name: str) -> torch.Tensor:
        return streamed.checkpoint.get(f"{name}.weight")

    if state.get("sparsities") is None:
        def dense_norms(targets):
            collector = NormCollector()
            _stream_pass(streamed, SequentialCalibration(adapter, collector, "dense",
                                                         group.reduce_statistics if group else None),
                         windows, batch_size, group_by_block(targets), "Outlier scores")
            return collector.norms

        state["sparsities"] = allocate_sparsities(plan, weight_of, dense_norms, overrides)
    sparsities: dict[str, float] = state["sparsities"]
    pruner = Pruner(plan.method, sparsities, plan.pattern)
    active = [t for t in plan.targets if sparsities[t.name] > 0]
    by_block = group_by_block([t for t in active if t.block is not None])
    calibration_steps = SequentialCalibration(adapter, pruner, sequential if sequential != "dense" else "layer",
                                              group.reduce_statistics if group else None)
    first = state["completed_blocks"]
    activations = work / f"activations.rank{group.rank if group else 0}.pt"
    if plan.method.needs_calibration:
        if first > 0:
            calibration_steps.inputs = _load_activations(activations)
        else:
            with streamed.loaded(*streamed.pre_block_modules()):
                calibration_steps.capture(streamed.model, windows, batch_size)
    layers: list[dict] = state["layers"]
    block_seconds: list[float] = state["block_seconds"]
    with progress_bar(f"Pruning ({plan.method.name}, streamed)", len(blocks)) as bar:
        bar.advance(first)
        for index in range(first, len(blocks)):
            block_started = time.perf_counter()
            block = blocks[index]
            targets = by_block.get(index, {})
            with streamed.loaded(block):
                _check_finite_block(block, adapter.block_name(index))
                if plan.method.needs_calibration:
                    calibration_steps.run_block(index, block, targets)
                else:
                    with torch.no_grad():
                        for target in targets.values():
                            pruner.process(target, None)
                prefix = adapter.block_name(index)
                tensors = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
                layers.extend(asdict(layer_result(t, sparsities[t.name])) for t in plan.targets if t.block == index)
                if writer:
                    write_shard(work, shard_name(index, total_shards), tensors)
                    if save_compressed:
                        write_compressed_shard(tensors, work / COMPRESSED_SUBDIR / _compressed_name(index, total_shards),
                                               codec)
            del tensors
            if plan.method.needs_calibration:
                _save_activations(activations, calibration_steps.inputs)
            block_seconds.append(time.perf_counter() - block_started)
            if group is not None:
                group.barrier()
            state["completed_blocks"] = index + 1
            if writer:
                write_text(work / STATE_FILE, json.dumps(state, indent=1))
            bar.advance()

    outside = _finish_outside_blocks(streamed, plan, by_name, sparsities, pruner, calibration_steps, work,
                                     total_shards, writer, save_compressed, codec, layers)
    result = PruneResult(method=describe(plan.method), pattern=str(plan.pattern), allocation=describe(plan.allocation),
                         sparsity=plan.sparsity, sequential=sequential if plan.method.needs_calibration else "none",
                         layers=[LayerResult(**{**layer, "shape": tuple(layer["shape"])}) for layer in layers],
                         seconds=time.perf_counter() - started,
                         calibration_windows=int(calibration.shape[0]) if calibration is not None and plan.needs_data else 0)
    outcome = StreamResult(result=result, out_dir=out, block_seconds=block_seconds, resumed_from_block=first)
    if writer:
        shards = [shard_name(i, total_shards) for i in range(total_shards)]
        write_index(work, shards)
        output_dirs = [work] + ([work / COMPRESSED_SUBDIR] if save_compressed else [])
        for directory in output_dirs:
            _copy_side_files(model_dir, directory)
            if outside["untied"]:
                config = json.loads((directory / "config.json").read_text())
                config["tie_word_embeddings"] = False
                (directory / "config.json").write_text(json.dumps(config, indent=2))
        outcome.dense_bytes = sum((work / s).stat().st_size for s in shards)
        if save_compressed:
            compressed = work / COMPRESSED_SUBDIR
            files = [_compressed_name(i, total_shards) for i in range(total_shards)]
            marker = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "codec": codec, "weights": files,
                      "architecture": type(streamed.model).__name__}
            (compressed / COMPRESSED_MARKER).write_text(json.dumps(marker, indent=2))
            outcome.compressed_bytes = sum((compressed / f).stat().st_size for f in files)
            outcome.compressed_without_codec_bytes = outside["without_codec"]
        for leftover in work.glob("activations.rank*.pt"):
            leftover.unlink()
        state["status"] = "complete"
        state["seconds"] = result.seconds
        write_text(work / STATE_FILE, json.dumps(state, indent=1))
        if finalize is not None:
            finalize(work, outcome)
        replace_directory(work, out)
    if group is not None:
        group.barrier()
    return outcome


def _compressed_name(index: int, total: int) -> str:
    return f"model.sparse-{index + 1:05d}-of-{total:05d}.safetensors"


def _open_work_dir(work: Path, out: Path, settings: dict, resume: bool, overwrite: bool, input_bytes: int,
                   save_compressed: bool) -> dict:
    if out.exists() and not overwrite:
        raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
    state_path = work / STATE_FILE
    if resume:
        if not state_path.exists():
            raise PrunekitError(f"nothing to resume: {work} holds no interrupted run")
        state = json.loads(state_path.read_text())
        differences = _different_settings(state["settings"], settings)
        if differences:
            raise PrunekitError("the interrupted run used other settings (" + "; ".join(differences)
                                + "); rerun with its settings, or start over without --resume")
        return state
    if work.exists():
        if not overwrite:
            raise PrunekitError(f"an interrupted run is in {work}; add --resume to continue it, "
                                "or --overwrite to start over")
        shutil.rmtree(work)
    needed = int(input_bytes * (1.7 if save_compressed else 1.05))
    _check_disk(out, needed)
    state = {"status": "running", "settings": settings, "completed_blocks": 0, "layers": [], "block_seconds": [],
             "sparsities": None}
    (work / COMPRESSED_SUBDIR).mkdir(parents=True, exist_ok=True)
    write_text(state_path, json.dumps(state, indent=1))
    return state


def _check_finite_block(block: torch.nn.Module, name: str) -> None:
    for local, parameter in block.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise PrunekitError(f"weight {name}.{local} contains NaN or inf; refusing to prune a broken model")


def _stream_pass(streamed: StreamedModel, steps: SequentialCalibration, windows: torch.Tensor, batch_size: int,
                 by_block: dict, description: str) -> None:
    """Run calibration windows through every block once (loading and releasing each)."""
    blocks = streamed.adapter.blocks()
    with streamed.loaded(*streamed.pre_block_modules()):
        steps.capture(streamed.model, windows, batch_size)
    last = max((b for b in by_block if b != HEAD), default=-1)
    with progress_bar(description, last + 1) as bar:
        for index in range(last + 1):
            with streamed.loaded(blocks[index]):
                steps.run_block(index, blocks[index], by_block.get(index, {}))
            bar.advance()


def _finish_outside_blocks(streamed: StreamedModel, plan, by_name, sparsities, pruner, steps, work: Path,
                           total_shards: int, writer: bool, save_compressed: bool, codec: str,
                           layers: list[dict]) -> dict:
    """Prune targets outside the blocks (head, embeddings) and write the last shard."""
    adapter = streamed.adapter
    head, embeddings, norm = adapter.head(), adapter.embeddings(), adapter.final_norm()
    outside_targets = [t for t in plan.targets if t.block is None or t.block == HEAD]
    # Pruning either half of a tied pair stores the head separately from then on.
    untied = streamed.tied and any(t.module is head or t.module is embeddings for t in outside_targets)
    tensors = {name: streamed.checkpoint.get(name) for name in streamed.outside_blocks()}
    if outside_targets:
        modules = [m for m in (embeddings, norm, head) if m is not None and not (m is head and streamed.tied)]
        with streamed.loaded(*modules):
            if untied:
                head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
            head_targets = [t for t in outside_targets if t.block == HEAD and sparsities[t.name] > 0]
            if head_targets:
                steps.run_head(head_targets)
            with torch.no_grad():
                for target in outside_targets:
                    if target.block is None and sparsities[target.name] > 0:
                        pruner.process(target, None)
            for target in outside_targets:
                tensors[f"{target.name}.weight"] = target.module.weight.detach().clone()
                layers.append(asdict(layer_result(target, sparsities[target.name])))
            if untied:
                tensors[f"{adapter.head_path}.weight"] = head.weight.detach().clone()
    without_codec = 0
    if writer:
        write_shard(work, shard_name(total_shards - 1, total_shards), tensors)
        if save_compressed:
            write_compressed_shard(tensors, work / COMPRESSED_SUBDIR / _compressed_name(total_shards - 1, total_shards),
                                   codec)
            for i in range(total_shards):
                with safe_open(str(work / COMPRESSED_SUBDIR / _compressed_name(i, total_shards)), "pt") as handle:
                    without_codec += manifest_size_without_codec(sparse_format.metadata_to_manifest(handle.metadata()))
    return {"untied": untied, "without_codec": without_codec}
