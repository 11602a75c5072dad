"""Out-of-core pruning at scale, multi-process calibration and resume (issue: models that outgrow the machine).

1. Writes a random-weight Llama-architecture model of ~3.5 B parameters (bf16, one safetensors shard
   per block) without ever holding it in memory, then prunes it with ``prunekit prune --stream``
   (Wanda 50 % and SparseGPT 2:4) and records peak RSS against the size on disk, and the time per
   block against SmolLM2's under the same calibration settings.
2. SmolLM2-135M with 1 and 2 gloo processes (torchrun): masks compared, wall time ratio.
3. SmolLM2 streamed, killed with SIGKILL after a random block, resumed: output hashes compared with
   an uninterrupted run.

    flock /tmp/prunekit-cpu.lock python benchmarks/streaming_large.py
Writes benchmarks/results/streaming_large.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from prunekit.core.cache import cache_dir  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.io.shards import INDEX, shard_name, write_index  # noqa: E402
from prunekit.models.assets import smollm2_path  # noqa: E402

HERE = Path(__file__).resolve().parent
BIG = dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
           num_key_value_heads=32, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
           rms_norm_eps=1e-5)


def make_big_model(directory: Path, seed: int = 0) -> Path:
    """A random Llama checkpoint written shard by shard (one per block), never whole in memory."""
    from transformers import LlamaConfig

    from prunekit.models.loading import load_tokenizer

    if (directory / INDEX).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    config = LlamaConfig(**BIG, dtype="bfloat16")
    h, f, layers = BIG["hidden_size"], BIG["intermediate_size"], BIG["num_hidden_layers"]
    total = layers + 1

    def randn(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    for index in range(layers):
        prefix = f"model.layers.{index}."
        tensors = {prefix + "self_attn.q_proj.weight": randn(h, h), prefix + "self_attn.k_proj.weight": randn(h, h),
                   prefix + "self_attn.v_proj.weight": randn(h, h), prefix + "self_attn.o_proj.weight": randn(h, h),
                   prefix + "mlp.gate_proj.weight": randn(f, h), prefix + "mlp.up_proj.weight": randn(f, h),
                   prefix + "mlp.down_proj.weight": randn(h, f),
                   prefix + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   prefix + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        save_file(tensors, str(directory / shard_name(index, total)), metadata={"format": "pt"})
        print(f"wrote block {index + 1}/{layers}", flush=True)
    save_file({"model.embed_tokens.weight": randn(BIG["vocab_size"], h), "lm_head.weight": randn(BIG["vocab_size"], h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
              str(directory / shard_name(layers, total)), metadata={"format": "pt"})
    write_index(directory, [shard_name(i, total) for i in range(total)])
    config.save_pretrained(directory)
    load_tokenizer(smollm2_path()).save_pretrained(directory)
    return directory


def prunekit_cli(args: list[str], processes: int = 1, threads: int = 2) -> tuple[int, float, str]:
    env = dict(os.environ, PRUNEKIT_QUIET="1", OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    started = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "prunekit", "prune", *args], env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started, done.stderr[-3000:]


def disk_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def tree_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors"))}


def streamed_run(model: Path, out: Path, method: list[str], calib: list[str], threads: int = 2) -> dict:
    code, wall, err = prunekit_cli([str(model), *method, *calib, "--stream", "--no-eval", "--out", str(out),
                                    "--overwrite", "--threads", str(threads)], threads=threads)
    if code != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {code}"}
    report = json.loads((out / "report.json").read_text())
    blocks = report["run"]["block_seconds"]
    return {"wall_seconds": wall, "prune_seconds": report["timing"]["prune_seconds"],
            "peak_rss_bytes": report["memory"]["process_peak_rss_bytes"],
            "peak_rss_sampled_bytes": report["memory"]["peak_rss_during_prune_bytes"],
            "median_block_seconds": sorted(blocks)[len(blocks) // 2], "blocks": len(blocks),
            "achieved_sparsity": report["sparsity"]["achieved_in_targets"],
            "output_bytes": disk_size(out), "compressed_bytes": report["size"].get("compressed_bytes")}


def part_scale(args, results: dict) -> None:
    big = make_big_model(Path(args.big_dir))
    smol = smollm2_path()
    calib = ["--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    results["big_model"] = {"path": str(big), "bytes_on_disk": disk_size(big), "config": BIG,
                            "parameters": sum(v.numel() for f in big.glob("*.safetensors")
                                              for v in load_file(str(f), device="cpu").values())
                            if args.count_parameters else None}
    results["scale"] = []
    for label, method in (("Wanda 50 %", ["--method", "wanda", "--sparsity", "0.5"]),
                          ("SparseGPT 2:4", ["--method", "sparsegpt", "--pattern", "2:4"])):
        for name, model in (("3.5B random", big), ("SmolLM2-135M", smol)):
            out = Path(args.work) / f"scale-{name.split()[0]}-{method[1]}"
            # Each model is computed and stored in its own dtype (bf16 for the big one, fp32 for SmolLM2).
            dtype = ["--dtype", "bfloat16" if model == big else "float32"]
            record = streamed_run(model, out, method, calib + dtype)
            record.update(run=label, model=name, model_bytes=disk_size(model))
            results["scale"].append(record)
            print(record, flush=True)
            shutil.rmtree(out, ignore_errors=True)


def _compare(a: dict, b: dict) -> dict:
    """Mask agreement and largest weight difference over the decoder blocks' matrices."""
    equal = total = 0
    max_diff = 0.0
    for name, one in a.items():
        if one.dim() == 2 and name.startswith("model.layers."):
            equal += int(((one == 0) == (b[name] == 0)).sum())
            total += one.numel()
            max_diff = max(max_diff, float((one - b[name]).abs().max()))
    return {"mask_agreement": equal / total, "max_abs_weight_difference": max_diff}


# (processes, threads per process): the comparison is 1 x 2 against 2 x 1; 1 x 1 separates
# what splitting the calibration across ranks changes from what the thread count alone changes.
RANK_LAYOUTS = ((1, 2), (2, 1), (1, 1))


def part_ranks(args, results: dict) -> None:
    smol = str(smollm2_path())
    calib = ["--calib-samples", "32", "--seq-len", "512", "--no-eval", "--no-compressed"]
    results["ranks"] = []
    for method in ("wanda", "sparsegpt"):
        outs = {}
        record: dict = {"method": method}
        for processes, threads in RANK_LAYOUTS:
            key = f"{processes}x{threads}"
            out = Path(args.work) / f"ranks-{method}-{key}"
            code, wall, err = prunekit_cli([smol, "--method", method, *calib, "--out", str(out), "--overwrite",
                                            "--threads", str(threads)], processes=processes, threads=threads)
            if code != 0:
                record[f"error_{key}"] = err.strip().splitlines()[-1]
                continue
            report = json.loads((out / "report.json").read_text())
            record[f"prune_seconds_{key}"] = report["timing"]["prune_seconds"]
            record[f"wall_seconds_{key}"] = wall
            outs[key] = load_file(str(out / "model.safetensors"))
            shutil.rmtree(out, ignore_errors=True)
        pairs = {"1x2 vs 2x1": ("1x2", "2x1"), "1x1 vs 2x1 (split alone)": ("1x1", "2x1"),
                 "1x2 vs 1x1 (threads alone)": ("1x2", "1x1")}
        record["comparisons"] = {label: _compare(outs[a], outs[b]) for label, (a, b) in pairs.items()
                                 if a in outs and b in outs}
        if "1x2" in outs and "2x1" in outs:
            record["time_ratio_two_over_one"] = record["prune_seconds_2x1"] / record["prune_seconds_1x2"]
        results["ranks"].append(record)
        print(record, flush=True)


def part_resume(args, results: dict) -> None:
    smol = str(smollm2_path())
    common = [smol, "--method", "sparsegpt", "--sparsity", "0.5", "--calib-samples", "16", "--seq-len", "256",
              "--no-eval", "--stream", "--threads", "2"]
    reference, out = Path(args.work) / "resume-reference", Path(args.work) / "resume-out"
    for path in (reference, out, out.with_name(out.name + ".partial")):
        shutil.rmtree(path, ignore_errors=True)
    code, _, err = prunekit_cli([*common, "--out", str(reference)])
    assert code == 0, err
    kill_after = random.Random(args.seed).randint(1, 28)
    env = dict(os.environ, PRUNEKIT_QUIET="1", OMP_NUM_THREADS="2")
    process = subprocess.Popen([sys.executable, "-m", "prunekit", "prune", *common, "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out.with_name(out.name + ".partial") / "prunekit_run.json"
    while process.poll() is None:
        try:
            if json.loads(state.read_text()).get("completed_blocks", 0) >= kill_after:
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    completed = json.loads(state.read_text())["completed_blocks"]
    code, _, err = prunekit_cli([*common, "--out", str(out), "--resume"])
    record = {"killed_after_block": completed, "resume_exit": code}
    if code == 0:
        ours, theirs = tree_hashes(out), tree_hashes(reference)
        record.update(files=len(ours), identical=ours == theirs,
                      resumed_from=json.loads((out / "report.json").read_text())["run"]["resumed_from_block"])
    else:
        record["error"] = err.strip().splitlines()[-1]
    results["resume"] = record
    print(record, flush=True)


def to_markdown(results: dict) -> str:
    lines = ["# Out-of-core pruning, multi-process calibration, resume", ""]
    if "scale" in results:
        big = results["big_model"]
        lines += [f"Random Llama model: hidden {BIG['hidden_size']}, MLP {BIG['intermediate_size']}, "
                  f"{BIG['num_hidden_layers']} blocks, vocab {BIG['vocab_size']}, untied, bf16: "
                  f"{big['bytes_on_disk'] / 2**30:.2f} GiB on disk.", ""]
        rows = []
        for r in results["scale"]:
            if "error" in r:
                rows.append((r["run"], r["model"], "fails: " + r["error"], "", "", "", ""))
                continue
            rows.append((r["run"], r["model"], f"{r['model_bytes'] / 2**30:.2f}", f"{r['peak_rss_bytes'] / 2**30:.2f}",
                         f"{r['peak_rss_bytes'] / r['model_bytes']:.1%}", f"{r['median_block_seconds']:.2f}",
                         f"{r['prune_seconds']:.0f}"))
        lines += [markdown_table(["run", "model", "size on disk GiB", "peak RSS GiB", "RSS / size", "s per block (median)",
                                  "prune s"], rows), ""]
    if "ranks" in results:
        nan = float("nan")
        rows = [(r["method"], f"{r.get('prune_seconds_1x2', nan):.1f}", f"{r.get('prune_seconds_2x1', nan):.1f}",
                 f"{r.get('time_ratio_two_over_one', nan):.2f}", f"{r.get('prune_seconds_1x1', nan):.1f}")
                for r in results["ranks"]]
        lines += ["SmolLM2-135M, 32 × 512 calibration tokens, prune time in seconds by processes × threads per process:",
                  "", markdown_table(["method", "1 × 2", "2 × 1 (gloo)", "ratio 2 × 1 / 1 × 2", "1 × 1"], rows), "",
                  "Agreement of the pruned weights (decoder blocks' matrices):", ""]
        rows = [(r["method"], label, f"{c['mask_agreement']:.6f}", f"{c['max_abs_weight_difference']:.2e}")
                for r in results["ranks"] for label, c in r.get("comparisons", {}).items()]
        lines += [markdown_table(["method", "runs compared", "mask agreement", "max |Δw|"], rows), ""]
    if "resume" in results:
        r = results["resume"]
        lines += [f"Resume: SmolLM2 SparseGPT 50 % streamed, SIGKILL after block {r['killed_after_block']}, resumed "
                  f"from block {r.get('resumed_from')}: {r.get('files')} output files, identical hashes: "
                  f"{r.get('identical')}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="scale,ranks,resume")
    parser.add_argument("--big-dir", default=str(cache_dir("bench") / "llama-3.5b-random-bf16"))
    parser.add_argument("--work", default=str(cache_dir("bench") / "work"))
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-parameters", action="store_true")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = {"environment": environment()}
    path = HERE / "results" / "streaming_large.json"
    if path.exists():
        results.update(json.loads(path.read_text()))
    for part in args.parts.split(","):
        {"scale": part_scale, "ranks": part_ranks, "resume": part_resume}[part](args, results)
        write_json(path, results)
        (HERE / "results" / "streaming_large.md").write_text(to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
