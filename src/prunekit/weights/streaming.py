"""Out-of-core one-shot pruning: one block in memory at a time, output written as it goes, resumable.

The model is a meta-device skeleton over its memory-mapped safetensors shards. Each block is
loaded, calibrated and pruned exactly as in memory (the same ``SequentialCalibration`` steps),
written as its own output shard, and released. Peak memory is about one block, the calibration
activations and the embeddings, whatever the depth.

Work happens in ``OUT.partial``; ``prunekit_run.json`` there is the run's state, always replaced
atomically. Every step either leaves the state as it was (and is redone, identically, on resume)
or ends with a state commit that is only made once the files it vouches for exist:

1. the partial directory appears whole, state included (it is built beside and renamed);
2. the per-layer sparsities (OWL's dense pass) are committed;
3. per block ``i``: its output shards are written, then its outputs are saved as the inputs of
   block ``i + 1`` (``activations.rank<R>.block<i+1>.pt``), then the state says ``i + 1`` blocks
   are done, and only then are block ``i``'s inputs deleted. A resumed run reads the inputs of
   the first block not done, which therefore always exist and are never a block's own outputs;
4. the last shard (embeddings, norm, head) is written and committed, then activations go;
5. index, config and compressed marker are (re)written, the caller's ``finalize`` writes
   reports, the state is marked ``complete`` and the directory is renamed to ``OUT``.

A run killed at any point and restarted with ``resume=True`` produces byte-identical output; a
run already renamed is recognised as finished. ``PRUNEKIT_FAULT_AT`` (see ``_fault``) lets tests
kill the process after each of these steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open

from prunekit.core.calibration import BlockInputs, SequentialCalibration, Target
from prunekit.core.distributed import ProcessGroup
from prunekit.errors import PrunekitError
from prunekit.io.atomic import (check_free_space, make_temporary_dir, replace_directory, scratch_path,
                                 writing_output, write_text)
from prunekit.io.checkpoint import COMPRESSED_MARKER, write_compressed_shard
from prunekit.io import sparse_format
from prunekit.io.shards import INDEX, saved_model_bytes, shard_name, write_index, write_shard
from prunekit.io.sparse_format import FORMAT_NAME, FORMAT_VERSION, manifest_size_without_codec
from prunekit.models.streamed import StreamedModel
from prunekit.weights.pipeline import (
    BlockSource,
    LayerResult,
    PrunePlan,
    PruneResult,
    Pruner,
    allocate_ratios,
    dense_norms_pass,
    layer_result,
    plan_pruning,
    prune_blocks,
    prune_result,
    pruning_settings,
)

STATE_FILE = "prunekit_run.json"
COMPRESSED_SUBDIR = "compressed"
FAULT_ENV = "PRUNEKIT_FAULT_AT"
# Every point ``_fault`` is called at, in run order; those marked per block take ``:<block>``.
FAULT_POINTS = ("created", "allocated", "shard:", "activations:", "committed:", "cleaned:", "outside",
                "outside_committed", "released", "assembled", "finalized", "complete", "renamed")


@dataclass
class StreamResult:
    result: PruneResult
    out_dir: Path
    block_seconds: list[float] = field(default_factory=list)
    dense_bytes: int = 0
    compressed_bytes: int = 0
    compressed_without_codec_bytes: int = 0
    resumed_from_block: int = 0
    already_finished: bool = False  # the run had completed before: no finalize, its reports stand


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _fault(point: str, block: int | None = None) -> None:
    """Test-only fault injection: ``PRUNEKIT_FAULT_AT=<point>[:<block>]`` SIGKILLs this process there.

    SIGKILL, not an exception, so no ``finally`` or cleanup runs: exactly what a kill or a
    power loss leaves behind. Not meant for users; the points are ``FAULT_POINTS``.
    """
    wanted = os.environ.get(FAULT_ENV)
    if wanted and wanted == (point if block is None else f"{point}:{block}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _windows_digest(windows: torch.Tensor | None) -> str | None:
    if windows is None:
        return None
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()[:16]


def _activations_path(work: Path, rank: int, block: int) -> Path:
    return work / f"activations.rank{rank}.block{block:05d}.pt"


def _save_activations(path: Path, inputs: BlockInputs) -> None:
    tmp = scratch_path(path)
    torch.save(inputs.to_state(), tmp)
    os.replace(tmp, path)


def _load_activations(path: Path) -> BlockInputs:
    if not path.exists():
        raise PrunekitError(f"cannot resume: {path.name} is missing from the partial run; "
                            "start over with --overwrite")
    try:
        data = torch.load(path, weights_only=True)
        return BlockInputs.from_state(data)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise PrunekitError(f"cannot resume: {path.name} is unreadable ({type(exc).__name__}); "
                            "start over with --overwrite") from None


def _copy_side_files(source: Path, target: Path, untied: bool, dtype: torch.dtype) -> None:
    """Config, generation config and tokenizer files: everything but the weights and our own state."""
    for item in source.iterdir():
        if (item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt", ".gguf"))
                and item.name not in (INDEX, STATE_FILE, COMPRESSED_MARKER)):
            shutil.copy2(item, target / item.name)
    config_path = target / "config.json"
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    updates = {"dtype": str(dtype).removeprefix("torch.")}
    if "torch_dtype" in config:
        updates["torch_dtype"] = updates["dtype"]
    if untied:
        updates["tie_word_embeddings"] = False
    # The config must describe the stored weights: streamed evaluation and from_pretrained read it.
    if any(config.get(key) != value for key, value in updates.items()):
        write_text(config_path, json.dumps({**config, **updates}, indent=2))


def _different_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{key}: {saved.get(key)!r} → {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PrunekitError(f"{path} is unreadable ({exc}); start over with --overwrite") from None
    if not isinstance(state, dict) or "settings" not in state:
        raise PrunekitError(f"{path} is not a prunekit run state; start over with --overwrite")
    return state


def _needed_bytes(streamed: StreamedModel, windows: torch.Tensor | None, output: StreamOutput) -> int:
    needed = saved_model_bytes(streamed.checkpoint.tensor_bytes(streamed.dtype), output.save_dense,
                               output.save_compressed)
    if windows is not None:
        # A block's inputs and outputs are on disk together for a moment.
        hidden = getattr(streamed.config, "hidden_size", 0) or 0
        needed += 2 * windows.numel() * hidden * torch.empty((), dtype=streamed.dtype).element_size()
    return needed


def _one_writer(run: Callable[..., StreamResult]) -> Callable[..., StreamResult]:
    """Hold the locks on ``out`` and ``out.partial`` for the whole run (the writer's; other ranks only read).

    Two runs on one output interleaved their shards and corrupted it; with the locks the second is
    refused at once. An interruption leaves the partial run: the exception says so (``_kept_in``).
    """
    @functools.wraps(run)
    def locked(model_dir: str | Path, out: str | Path, *args: Any, **kwargs: Any) -> StreamResult:
        group = kwargs.get("group")
        if group is not None and not group.is_writer:
            return run(model_dir, out, *args, **kwargs)
        work = partial_dir(Path(out).expanduser().resolve())
        with writing_output(out), writing_output(work, keeps=lambda: _kept_in(work)):
            return run(model_dir, out, *args, **kwargs)
    return locked


def _kept_in(work: Path) -> str | None:
    """What an interrupted run leaves in its partial directory, and how to continue it."""
    try:
        state = json.loads((work / STATE_FILE).read_text())
        done = int(state["completed_blocks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no partial run on disk: nothing was kept
    if state.get("status") == "complete":
        kept = "the finished run (only its rename was missing)"
    elif done:
        kept = f"blocks 0..{done - 1}" if done > 1 else "block 0"
    else:
        kept = "the run's settings (no block finished yet)"
    return f"{kept} kept in {work}; rerun the same command with --resume to continue"


@dataclass
class StreamOutput:
    """What a streamed run writes besides the pruning itself."""

    save_dense: bool = True
    save_compressed: bool = True
    codec: str = "zstd"
    resume: bool = False
    overwrite: bool = False


class StreamedBlocks(BlockSource):
    """Blocks loaded from disk one at a time, each written out as its own shard once pruned, the run's state
    committed after every step (see the module docstring)."""

    def __init__(self, streamed: StreamedModel, plan: PrunePlan, ratios: Mapping[str, float], work: Path,
                 state: dict, output: StreamOutput, group: ProcessGroup | None):
        super().__init__(streamed.model)
        self.streamed, self.plan, self.ratios, self.work, self.state = streamed, plan, ratios, work, state
        self.output, self.group = output, group
        self.writer = group is None or group.is_writer
        self.rank = group.rank if group is not None else 0
        self.total_shards = len(plan.adapter.blocks()) + 1
        self.calibrated = plan.method.needs_calibration
        self.mark = time.perf_counter()

    def loaded(self, *modules):
        return self.streamed.loaded(*modules)

    def capture_modules(self):
        return self.streamed.capture_modules()

    def outside_modules(self):
        return self.streamed.modules_outside_blocks()

    def block_loaded(self, index: int, block: torch.nn.Module) -> None:
        _check_finite_block(block, self.plan.adapter.block_name(index))

    def block_done(self, index: int, block: torch.nn.Module, steps: SequentialCalibration) -> None:
        prefix = self.plan.adapter.block_name(index)
        tensors = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        self.state["layers"].extend(asdict(layer_result(t, self.ratios[t.name]))
                                    for t in self.plan.targets if t.block == index)
        if self.writer:
            _write_shards(self.work, index, self.total_shards, tensors, self.output)
        del tensors
        _fault("shard", index)
        if self.calibrated:
            _save_activations(_activations_path(self.work, self.rank, index + 1), steps.inputs)
            _fault("activations", index)
        now = time.perf_counter()
        self.state["block_seconds"].append(now - self.mark)
        self.mark = now
        self.state["completed_blocks"] = index + 1
        _commit(self.work, self.state, self.writer, self.group)
        _fault("committed", index)
        if self.calibrated:
            _activations_path(self.work, self.rank, index).unlink(missing_ok=True)
        _fault("cleaned", index)

    def outside_done(self, targets: list[Target]) -> None:
        """The last shard: embeddings, norm and head, pruned or as they were."""
        streamed, adapter = self.streamed, self.plan.adapter
        # Loaders, not tensors: the writers read each one when they write it (the embeddings and the
        # head of a 3.5 B model are 630 MB together; held at once they were the run's memory peak).
        tensors: dict[str, torch.Tensor | Callable[[], torch.Tensor]] = {
            name: functools.partial(_read_as, streamed, name) for name in streamed.outside_blocks()}
        for target in targets:
            tensors[f"{target.name}.weight"] = target.module.weight.detach().clone()
            self.state["layers"].append(asdict(layer_result(target, self.ratios[target.name])))
        if self.plan.untie:
            tensors[f"{adapter.head_path}.weight"] = adapter.head().weight.detach().clone()
        if self.writer:
            _write_shards(self.work, self.total_shards - 1, self.total_shards, tensors, self.output)
        self.state["outside"] = {"untied": self.plan.untie}
        _fault("outside")
        _commit(self.work, self.state, self.writer, self.group)
        _fault("outside_committed")


@_one_writer
def prune_streaming(model_dir: str | Path, out: str | Path, settings: Any = None, *,
                    calibration: torch.Tensor | None = None, output: StreamOutput | None = None,
                    device: str = "cpu", dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
                    group: ProcessGroup | None = None, extra_settings: Mapping[str, Any] | None = None,
                    finalize: Callable[[Path, StreamResult], None] | None = None, **options: Any) -> StreamResult:
    """Prune a safetensors checkpoint block by block into ``out`` (see the module docstring).

    ``settings`` is a ``PruneSettings`` (or a method name, the other pruning settings then keywords, as
    ``prune_weights`` takes them). ``dtype`` (default: the checkpoint's) is the dtype blocks are computed
    and stored in; ``output`` says what is written (``save_dense=False``: only ``out/compressed``).
    """
    output_keys = {"save_dense", "save_compressed", "codec", "resume", "overwrite"}
    output = output or StreamOutput(**{k: options.pop(k) for k in list(options) if k in output_keys})
    if not (output.save_dense or output.save_compressed):
        raise PrunekitError("writing neither the dense nor the compressed model would write no model")
    if isinstance(dtype, str):
        from prunekit.models.loading import parse_dtype

        dtype = parse_dtype(dtype)
    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out).expanduser().resolve()
    writer = group is None or group.is_writer
    rank = group.rank if group is not None else 0
    method = options.pop("method", None)
    if settings is not None and method is not None:
        raise PrunekitError("give the pruning settings or a method, not both")
    pruning = pruning_settings(settings if settings is not None else method, options.pop("ratio", None), **options)
    if pruning.lowrank.enabled:
        raise PrunekitError("the low-rank correction is fitted in memory; prune without streaming")
    streamed = StreamedModel(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                             blocks=pruning.blocks)
    plan = plan_pruning(streamed.model, pruning, calibration is not None)
    windows = group.share(calibration) if group is not None and calibration is not None else calibration
    run_settings = {"model": streamed.checkpoint.fingerprint(), "method": plan.method.settings(),
                    "pattern": str(plan.pattern), "allocation": plan.allocation.settings(), "sparsity": plan.ratio,
                    "include": list(pruning.include), "exclude": list(pruning.exclude),
                    "overrides": dict(pruning.overrides), "sequential": pruning.sequential,
                    "batch_size": pruning.batch_size, "dtype": str(streamed.dtype),
                    "untie_embeddings": pruning.untie_embeddings, "dense": output.save_dense,
                    "compressed": output.save_compressed, "codec": output.codec,
                    "calibration": _windows_digest(calibration), "processes": group.world_size if group else 1,
                    **(extra_settings or {})}
    work = partial_dir(out)
    calibrated = plan.method.needs_calibration
    blocks = plan.adapter.blocks()

    def open_work() -> tuple[dict, bool]:
        return _open_work_dir(work, out, run_settings, output.resume, output.overwrite,
                              lambda: _needed_bytes(streamed, calibration, output), calibrated)

    state, finished = _on_writer(group, open_work)
    _fault("created")
    if finished:
        outcome = StreamResult(result=_result(plan, state, calibration, started), out_dir=out,
                               block_seconds=state["block_seconds"], resumed_from_block=len(blocks),
                               already_finished=True)
        if group is not None:
            group.barrier()
        return outcome

    def weight_of(name: str) -> torch.Tensor:  # as the pruned block will hold it: in the compute dtype
        return streamed.checkpoint.get(f"{name}.weight").to(streamed.dtype)

    if state.get("sparsities") is None:
        reduce = group.reduce_statistics if group else None
        norms = dense_norms_pass(plan, StreamedBlocks(streamed, plan, {}, work, state, output, group), windows,
                                 reduce) if windows is not None else None
        state["sparsities"] = allocate_ratios(plan, weight_of, norms)
        _commit(work, state, writer, None)
        _fault("allocated")
    ratios: dict[str, float] = state["sparsities"]
    first = state["completed_blocks"]
    source = StreamedBlocks(streamed, plan, ratios, work, state, output, group)
    inputs = None
    if calibrated and first > 0 and state.get("outside") is None:
        inputs = _load_activations(_activations_path(work, rank, first))
    pruner = prune_blocks(plan, source, ratios, windows, reduce=group.reduce_statistics if group else None,
                          first=first, inputs=inputs, outside=state.get("outside") is None)
    for leftover in work.glob(f"activations.rank{rank}.block*.pt"):
        leftover.unlink()
    _fault("released")

    result = _result(plan, state, calibration, started, pruner)
    outcome = StreamResult(result=result, out_dir=out, block_seconds=state["block_seconds"], resumed_from_block=first)
    if writer:
        if state.get("status") != "complete":  # complete: reports are written, only the rename was missing
            _assemble(work, model_dir, streamed, source.total_shards, state["outside"]["untied"], output, outcome)
            _fault("assembled")
            if finalize is not None:
                finalize(work, outcome)
            _fault("finalized")
            state["status"] = "complete"
            state["seconds"] = result.seconds
            write_text(work / STATE_FILE, json.dumps(state, indent=1))
            _fault("complete")
        else:
            outcome.already_finished = True
        replace_directory(work, out)
        _fault("renamed")
    if group is not None:
        group.barrier()
    return outcome


def _on_writer(group: ProcessGroup | None, action: Callable[[], Any]) -> Any:
    """Run ``action`` on the writer only and hand its result (or its refusal) to every rank."""
    if group is None:
        return action()
    outcome: tuple[str, Any] | None = None
    if group.is_writer:
        try:
            outcome = ("ok", action())
        except PrunekitError as exc:
            outcome = ("error", str(exc))
    kind, value = group.broadcast_object(outcome)
    if kind == "error":
        raise PrunekitError(value)
    return value


def _commit(work: Path, state: dict, writer: bool, group: ProcessGroup | None) -> None:
    """Record ``state`` once every rank has written what it vouches for; return once it is recorded."""
    if group is not None:
        group.barrier()
    if writer:
        write_text(work / STATE_FILE, json.dumps(state, indent=1))
    if group is not None:
        group.barrier()


def _result(plan: PrunePlan, state: dict, calibration: torch.Tensor | None, started: float,
            pruner: Pruner | None = None) -> PruneResult:
    layers = [LayerResult(**{**layer, "shape": tuple(layer["shape"])}) for layer in state["layers"]]
    return prune_result(plan, layers, pruner, started, calibration)


def _compressed_name(index: int, total: int) -> str:
    return f"model.sparse-{index + 1:05d}-of-{total:05d}.safetensors"


def _write_shards(work: Path, index: int, total: int, tensors: Mapping[str, Any], output: StreamOutput) -> None:
    if output.save_dense:
        write_shard(work, shard_name(index, total), tensors)
    if output.save_compressed:
        write_compressed_shard(tensors, work / COMPRESSED_SUBDIR / _compressed_name(index, total), output.codec)


def _assemble(work: Path, model_dir: Path, streamed: StreamedModel, total_shards: int, untied: bool,
              output: StreamOutput, outcome: StreamResult) -> None:
    """Index, config, tokenizer and marker next to the shards, and the sizes; safe to repeat."""
    directories = []
    if output.save_dense:
        shards = [shard_name(i, total_shards) for i in range(total_shards)]
        write_index(work, shards)
        outcome.dense_bytes = sum((work / s).stat().st_size for s in shards)
        directories.append(work)
    if output.save_compressed:
        compressed = work / COMPRESSED_SUBDIR
        files = [_compressed_name(i, total_shards) for i in range(total_shards)]
        plain = without_codec = 0
        for file in files:
            with safe_open(str(compressed / file), "pt") as handle:
                manifest = sparse_format.metadata_to_manifest(handle.metadata())
            without_codec += manifest_size_without_codec(manifest)
            for entry in manifest["tensors"].values():
                numel = 1
                for size in entry["shape"]:
                    numel *= size
                plain += numel * torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()
        marker = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "codec": output.codec, "weights": files,
                  "architecture": type(streamed.model).__name__}
        write_text(compressed / COMPRESSED_MARKER, json.dumps(marker, indent=2))
        outcome.compressed_bytes = sum((compressed / f).stat().st_size for f in files)
        outcome.compressed_without_codec_bytes = without_codec
        if not output.save_dense:  # what the dense model would take, as the in-memory path reports it
            outcome.dense_bytes = plain
        directories.append(compressed)
    for directory in directories:
        _copy_side_files(model_dir, directory, untied, streamed.dtype)


def _open_work_dir(work: Path, out: Path, settings: dict, resume: bool, overwrite: bool,
                   needed_bytes: Callable[[], int], calibrated: bool) -> tuple[dict, bool]:
    """The run's state, and whether the run had already finished (``out`` is complete, nothing to do)."""
    state_path = work / STATE_FILE
    if resume:
        if not state_path.exists():
            finished = out / STATE_FILE
            if finished.exists() and _read_state(finished).get("status") == "complete":
                state = _read_state(finished)
                differences = _different_settings(state["settings"], settings)
                if differences:
                    raise PrunekitError(f"{out} holds a finished run with other settings ("
                                        + "; ".join(differences) + "); choose another --out")
                return state, True
            raise PrunekitError(f"nothing to resume: {work} holds no interrupted run")
        if out.exists() and not overwrite:
            raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
        state = _read_state(state_path)
        differences = _different_settings(state["settings"], settings)
        if differences:
            raise PrunekitError("the interrupted run used other settings (" + "; ".join(differences)
                                + "); rerun with its settings, or start over without --resume")
        _remove_stale(work, state, calibrated)
        return state, False
    if out.exists() and not overwrite:
        raise PrunekitError(f"output {out} already exists; pass --overwrite to replace it")
    if work.exists():
        if not overwrite:
            raise PrunekitError(f"an interrupted run is in {work}; add --resume to continue it, "
                                "or --overwrite to start over")
        _remove_tree(work)
    # What a kill left while creating or removing a partial directory went when its lock was taken.
    check_free_space(out, needed_bytes())
    state = {"status": "running", "settings": settings, "completed_blocks": 0, "layers": [], "block_seconds": [],
             "sparsities": None, "outside": None}
    # Built beside and renamed, so a partial directory always holds a state to resume from.
    fresh = make_temporary_dir(work.parent, f".{work.name}.new-")
    (fresh / COMPRESSED_SUBDIR).mkdir()
    write_text(fresh / STATE_FILE, json.dumps(state, indent=1))
    os.replace(fresh, work)
    return state, False


def _remove_tree(path: Path) -> None:
    """Rename first: a directory half deleted by a kill must not look like a run to resume."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}") if not path.name.startswith(".") else path
    if trash != path:
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(work: Path, state: dict, calibrated: bool) -> None:
    """Files a killed step left behind: half-written temporaries, activations no step will read."""
    for directory in (work, work / COMPRESSED_SUBDIR):
        for pattern in (".*.tmp*", ".*.data*"):
            for tmp in directory.glob(pattern):
                tmp.unlink(missing_ok=True)
    keep = state["completed_blocks"] if calibrated and state.get("outside") is None else None
    for path in work.glob("activations.rank*.block*.pt"):
        if keep is None or not path.name.endswith(f".block{keep:05d}.pt"):
            path.unlink()


def _check_finite_block(block: torch.nn.Module, name: str) -> None:
    for local, parameter in block.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise PrunekitError(f"weight {name}.{local} contains NaN or inf; refusing to prune a broken model")


def _read_as(streamed: StreamedModel, name: str) -> torch.Tensor:
    value = streamed.checkpoint.get(name)
    return value.to(streamed.dtype) if value.is_floating_point() else value
