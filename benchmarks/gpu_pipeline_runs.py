"""benchmarks/gpu_pipeline.py's parts quality and resume: the embedded model through `python -m qlora_helpers run`
in fp16 and in bf16, and the fp16 run killed mid-training and started again (gpu_pipeline.py's docstring says what
each records). The launches share the GPU at once; on the CPU (smoke mode) they run one after another."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import gpu_pipeline_measure as measure

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = {"fp16": {"quant.compute_dtype": "float16"}, "bf16": {"quant.compute_dtype": "bfloat16"},
              # bf16 training, the merged model stored and compared in bfloat16 instead of float16: which of the two
              # answers as the bf16-evaluated model did (issue 24); run with GPU_PIPELINE_PRECISIONS=bf16,bf16-ship-bf16
              "bf16-ship-bf16": {"quant.compute_dtype": "bfloat16", "eval.export_dtype": "bfloat16"}}
# Which quality runs a call makes (the resume part always continues the fp16 one).
CHOSEN = [p for p in os.environ.get("GPU_PIPELINE_PRECISIONS", "fp16,bf16").split(",") if p]
# The embedded profile also writes and scores GGUF files (eval.export_gguf: f16, q8_0), which needs llama.cpp's
# converter in a folder of its own (make setup's .venv/gguf-converter); it is not carried to the GPU machine, and
# the GGUF rows are not what issue 24 compares (the shipped merged model against the evaluated one): none made.
QUALITY_BASE = {"eval.export_gguf": "[]"}
SMOKE_QUALITY = {"quant.compute_dtype": "float32", "train.max_steps": 4, "train.save_steps": 2, "train.eval_steps": 2,
                 "train.logging_steps": 1, "data.embedded_size": 100, "eval.num_prompts": 2, "eval.max_new_tokens": 4,
                 "eval.max_val_examples": 8}


def pipeline_cmd(ctx, run_dir: Path, precision: str) -> list[str]:
    overrides = {**PRECISIONS[precision], **QUALITY_BASE, **(SMOKE_QUALITY if ctx.smoke else {})}
    return [ctx.python, "-m", "qlora_helpers", "run", "--profile", "embedded", "--run-dir", str(run_dir),
            *[a for k, v in overrides.items() for a in ("-p", f"{k}={v}")]]


class Job:
    """One `python -m qlora_helpers run`, in a session of its own, its output in a log file."""

    def __init__(self, ctx, name: str, cmd: list[str]):
        self.ctx, self.name, self.cmd = ctx, name, cmd
        self.log = ctx.logs / f"{name}.log"
        self.cells = cells = ctx.logs / f"{name}-cells.jsonl"
        self.t0 = time.time()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                         env=ctx.environ(QLORA_BENCH_CELL_LOG=cells))
        self.status, self.wall_s = None, None

    def poll(self, margin: float = 15) -> bool:
        """True once finished (or stopped at the deadline)."""
        if self.status is not None:
            return True
        if self.proc.poll() is None and self.ctx.left() >= margin:
            return False
        if self.proc.poll() is None:
            measure.kill_tree(self.proc.pid)
            self.proc.wait()
            self.status = "stopped at the deadline"
        else:
            self.status = "finished" if self.proc.returncode == 0 else f"failed with status {self.proc.returncode}"
        self.wall_s = round(time.time() - self.t0, 1)
        return True

    def result(self) -> dict:
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.is_file() else []
        stages = measure.stages(measure.read_jsonl(self.cells), measure.cells_by_sha(sorted((REPO / "notebooks").glob("*.ipynb"))))
        return {"command": " ".join(self.cmd[1:]), "status": self.status, "wall_s": self.wall_s, "log_tail": tail,
                "stages": {k: {m: s[m] for m in ("wall_s", "gpu_reserved_peak_gib", "rss_peak_gib", "failed")}
                           for k, s in stages.items()}}


def quality_of(run_dir: Path) -> dict:
    """The numbers issue 24 asks for, from a finished run's summary.json and export/metrics.json."""
    got = measure.run_summary(run_dir)
    s, export = got["summary"] or {}, got["export"] or {}
    ev, forms = s.get("eval", {}), (export.get("forms") or {})
    return {"val_loss_before": ev.get("val_loss_before"), "val_loss_after": ev.get("val_loss_after"),
            "exact_match_before": ev.get("exact_match_before"), "exact_match_after": ev.get("exact_match_after"),
            "stop_rate_after": ev.get("stop_rate_after"), "prompts": ev.get("prompts"), "shipped": s.get("shipped"),
            "forms_compared_in": forms.get("compared_in"), "forms": forms.get("scores"),
            "merge_check": export.get("verification"), "train": {k: (got["train"] or {}).get(k) for k in
                                                                 ("steps", "tokens_per_s", "wall_s", "best_eval_loss")},
            "memory": s.get("memory")}


def part_quality_resume(ctx, parts: list[str]) -> dict:
    out: dict = {}
    if ctx.left() < 180:
        return {p: {"status": "skipped", "why": f"{ctx.left():.0f} s left before the deadline"} for p in parts}
    convert = subprocess.run([ctx.python, "-c", "from qlora_helpers.sources import embedded_model_dir as d; print(d())"],
                             capture_output=True, text=True, env=ctx.environ(), cwd=REPO, timeout=300)
    if convert.returncode:  # every run would fail the same way: say it once
        why = "the embedded model could not be prepared: " + convert.stderr.strip()[-800:]
        return {p: {"status": "error", "why": why} for p in parts}
    runs = ctx.work / "runs"
    pending = []  # (name, start): on the GPU all at once (three runs fit it many times over); on the CPU one by one
    if "quality" in parts:
        for precision in CHOSEN:
            shutil.rmtree(runs / f"quality-{precision}", ignore_errors=True)
            pending.append((precision, lambda p=precision: Job(ctx, f"quality-{p}",
                                                                pipeline_cmd(ctx, runs / f"quality-{p}", p))))
    if "resume" in parts:
        shutil.rmtree(runs / "resume", ignore_errors=True)
        pending.append(("resume", lambda: Resume(ctx, runs / "resume")))
    parallel = 1 if ctx.smoke else len(pending)
    running, jobs, killer = {}, {}, None
    while pending or running:
        while pending and len(running) < parallel and ctx.left() > 60:
            name, start = pending.pop(0)
            running[name] = start()
        if ctx.left() <= 60:
            pending = []  # too late to start one
        for name, task in list(running.items()):
            if task.step() if isinstance(task, Resume) else task.poll():
                del running[name]
                if isinstance(task, Resume):
                    killer = task
                else:
                    jobs[name] = task
        time.sleep(0.1)
    if "quality" in parts:
        out["quality"] = {"profile": "embedded", "overrides": {**QUALITY_BASE, **(SMOKE_QUALITY if ctx.smoke else {})}, "precisions": {
            p: {"overrides": PRECISIONS[p], **(jobs[p].result() if p in jobs else {"status": "not started: no time left"}),
                **quality_of(runs / f"quality-{p}")} for p in CHOSEN}}
    if "resume" in parts:
        out["resume"] = killer.result(runs / "quality-fp16") if killer else {"status": "not started: no time left"}
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if d.is_dir() and d.name != "latest":
            shutil.copytree(d, ctx.logs / f"run-{d.name}", ignore=measure.big_files, dirs_exist_ok=True)
    return out


class Resume:
    """The fp16 run, SIGKILLed (every process it started, the notebook kernel in its own session included) once its
    first checkpoint is complete and training has logged a step past it; then the same command on the same run
    directory, which must resume from the newest complete checkpoint."""

    def __init__(self, ctx, run_dir: Path):
        self.ctx, self.run_dir = ctx, run_dir
        self.cmd = pipeline_cmd(ctx, run_dir, "fp16")
        self.first, self.second = Job(ctx, "resume-1", self.cmd), None
        self.kill: dict | None = None

    def step(self) -> bool:
        """Advance; True once both launches are over."""
        from qlora_helpers.checkpoints import checkpoint_problem

        if self.second is not None:
            return self.second.poll()
        if self.ctx.left() < 15:
            return self.first.poll()  # kills it: the deadline
        if self.kill is None and self.first.proc.poll() is None:
            folder = self.run_dir / "train" / "checkpoints"
            done = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                           and checkpoint_problem(p) is None), key=lambda p: int(p.name.split("-")[-1])) \
                if folder.is_dir() else []
            logged = [r["step"] for r in measure.logged_steps(self.run_dir)]
            if done and logged and max(logged) > int(done[-1].name.split("-")[-1]):
                training_over = (self.run_dir / "train" / "metrics.json").is_file()
                killed = measure.kill_tree(self.first.proc.pid)
                self.first.proc.wait()
                self.kill = {"after_checkpoint": done[-1].name, "last_logged_step": max(logged),
                             "mid_training": not training_over, "processes_killed": len(killed),
                             "at_s": round(time.time() - self.first.t0, 1)}
                self.first.status, self.first.wall_s = "SIGKILLed", self.kill["at_s"]
                self.second = Job(self.ctx, "resume-2", self.cmd)
            return False
        if self.first.poll():
            return True  # ended (or failed) before it could be killed: reported as such
        return False

    def result(self, reference: Path) -> dict:
        res = {"command": " ".join(self.cmd[1:]), "first": self.first.result(), "kill": self.kill,
               "second": self.second.result() if self.second else None}
        if not self.kill:
            res["status"] = "not killed: the first launch " + (self.first.status or "did not start training")
            return res
        train = measure.read_json(self.run_dir / "train" / "metrics.json", {})
        steps = [r["step"] for r in measure.logged_steps(self.run_dir)]
        mine = {r["step"]: r.get("loss") for r in measure.logged_steps(self.run_dir)}
        ref = {r["step"]: r.get("loss") for r in measure.logged_steps(reference)}
        resumed = train.get("resumed_from_step")
        after = [s for s in mine if resumed is not None and s > resumed and s in ref and mine[s] and ref[s]]
        res.update(resumed_from_step=resumed, steps=train.get("steps"), max_steps=train.get("max_steps"),
                   logged_train_steps=steps, every_step_once=len(steps) == len(set(steps)) and steps == sorted(steps),
                   sessions=sorted({r.get("session") for r in measure.logged_steps(self.run_dir)}),
                   loss_vs_uninterrupted={"steps": after, "max_rel_diff": round(max(
                       (abs(mine[s] - ref[s]) / abs(ref[s]) for s in after), default=0.0), 5) if after else None})
        ok = (self.second and self.second.status == "finished" and resumed is not None and resumed > 0
              and self.kill["mid_training"] and res["every_step_once"] and train.get("steps") == train.get("max_steps"))
        res["status"] = "resumed and finished" if ok else "FAILED: see second.log_tail and the logs"
        return res
