"""CPU probe (docs/reproduction.md, experiment 1): train one polynomial model under a variant schedule with the
project's loop, then print its loss curve and in-domain exact match by operation; appends to $PROBE_DIR/results.jsonl (default /tmp/polynomial_probe).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python3 benchmarks/reproduction/cpu/polynomial_probe.py NAME '{"iters": 500}'
    keys: iters, batch, seq, lr, warmup, train, in_ops ([0, 1] adds copy expressions), model [hidden, layers, heads], n, seed
"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from megatron_mtp.experiments import common, polynomial
from megatron_mtp.training.metrics import read_metrics
from megatron_mtp.tasks.io import read_jsonl

ROOT = os.environ.get("PROBE_DIR", "/tmp/polynomial_probe")
name = sys.argv[1]
v = json.loads(sys.argv[2])
spec = {"data": {"train": v.get("train", 200_000), "test": 200, "in_ops": tuple(v.get("in_ops", (1, 1))), "ood_ops": (2, 2)},
        "models": {"m": tuple(v.get("model", (128, 6, 4)))}, "iters": v.get("iters", 600),
        "batch": v.get("batch", 32), "seq": v.get("seq", 128), "warmup": v.get("warmup", 60), "lr": v.get("lr", 3e-3)}
data_root = f"{ROOT}/data-{spec['data']['train']}-{spec['data']['in_ops'][0]}"
if not os.path.exists(os.path.join(data_root, "data", "train_text_document.idx")):
    shared = common.prepare_task(data_root, "x", "cpu", spec, polynomial.write_dataset, spec["data"]["train"], 200, spec["data"]["in_ops"], (2, 2))
else:
    from megatron_mtp.data.preprocess import output_prefix_for
    info = json.load(open(os.path.join(data_root, "data", "dataset.json")))
    shared = common.shared_state(data_root, "x", "cpu", spec, dataset=info,
                                 train_prefix=output_prefix_for(os.path.join(data_root, "data", "train"), "text"))
shared["spec"] = spec
run_dir = f"{ROOT}/runs/{name}"
ov = {**polynomial.training_overrides(shared, "m", v.get("n", 1), v.get("seed", 0)), "logging.interval": 50,
      "data.cache_dir": f"{ROOT}/cache-{name}"}
ov.update(v.get("extra", {}))
t0 = time.time()
common.train_model("polynomial", run_dir, ov)
wall = time.time() - t0
curve = [(m["step"], round(m["loss"], 3)) for m in read_metrics(run_dir) if "loss" in m]
res = polynomial.evaluate_run(run_dir, shared)["in_domain"]
out = {"name": name, "v": v, "wall_s": round(wall), "curve": curve, "exact": res["accuracy"], "digits": res["digit_accuracy"], "by_op": res["by_op"]}
print("RESULT", json.dumps(out), flush=True)
with open(f"{ROOT}/results.jsonl", "a") as f: f.write(json.dumps(out) + "\n")
