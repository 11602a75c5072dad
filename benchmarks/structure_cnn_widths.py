"""Side-by-side speed of the Fashion-MNIST ResNet-like CNN and shrunk copies of it, in one process.

Needs the benchmark's trained weights (benchmarks/results/raw/structure_fmnist/dense.pt, written by
``structure_fashion_mnist.py train``). Shrinks half the MACs by L2 with global allocation at round_to 4, 8
and 16 and with uniform allocation, and times each at batch 1 and 8 (images/s, median of 10 after 3
warm-ups, 2 threads), the dense model first and last. Speed does not depend on the weights' values, so
no fine-tuning is done.

    flock /tmp/prunekit-cpu.lock python benchmarks/structure_cnn_widths.py
"""
import copy
import sys, torch
sys.path.insert(0, "/work/main/benchmarks")
import structure_fashion_mnist as B
from prunekit.structure import prune_structure
from prunekit.structure.measure import SpeedProtocol, image_inputs, measure
torch.set_num_threads(2)
speed = SpeedProtocol(batch_sizes=(1, 8), runs=10, warmup=3, threads=2, seq_len=0)
def run(label, model):
    t = measure(model.eval(), image_inputs((1, 28, 28)), 1, speed, unit="images").to_dict()["throughput"]
    print(label, {k: round(v) for k, v in t.items()}, flush=True)
base = B.ResNetLike(widths=(16, 32, 64), blocks=(2, 2, 2))
base.load_state_dict(torch.load(B.RAW / "dense.pt", weights_only=True))
run("dense", base)
for rt in (4, 8, 16):
        m = copy.deepcopy(base)
    r = prune_structure(m, 0.5, example_inputs=(torch.zeros(1, 1, 28, 28),), importance="l2", target="macs",
                        allocation={"name": "global", "round_to": rt, "floor": 0.1})
    run(f"l2 global round_to {rt} {list(r.plan.widths.values())}", m)
m = copy.deepcopy(base)
r = prune_structure(m, 0.5, example_inputs=(torch.zeros(1, 1, 28, 28),), importance="l2", target="macs",
                    allocation={"name": "uniform", "round_to": 4, "floor": 0.1})
run(f"l2 uniform round_to 4 {list(r.plan.widths.values())}", m)
run("dense again", base)
