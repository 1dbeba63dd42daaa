"""`asset-dist pipeline`: the whole training chain (tokenizers -> guide -> SGA 512 -> SGA 1024) as dependent jobs.

A pipeline file (configs/pipelines/landscape.yaml, configs/pipelines/tiny.yaml; every key in docs/CONFIG.md)
lists the stages. Each names its stage config (relative to the pipeline file), its run folder, its resources
(asset_dist/jobspec.py), and `inputs`: which config keys take which parent stage's export
(RUN/export/<stage>.pt). A stage runs after its parents: on SLURM as a submitit job with
`--dependency=afterok:<parent jobs>`; with the local executor one after the other on this machine.

Re-running is safe: a stage whose export exists is finished and skipped; a stage whose job (recorded in
RUN/submitted.json) is still queued or running is not submitted again, and its dependents wait on that job.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from asset_dist.jobspec import PIPELINE_KEYS, STAGE_KEYS, Resources
from asset_dist.launch.submit import (EXECUTORS, TrainJob, add_resource_args, log_path, resolve_executor, slurm_state,
                                      state_active, submit_jobs, wait_job)

RECORD = "submitted.json"  # in each stage's run folder: the last job submitted for it


class PipelineError(ValueError):
    """A problem with the pipeline file, naming the file and the stage."""


@dataclass
class StageJob:
    """One stage of the chain as a job to submit (train/stage.py's Stage is what such a job trains)."""

    name: str
    config: Path  # absolute
    run_dir: Path  # absolute
    inputs: dict[str, str]  # config key -> parent stage whose export it takes
    after: list[str]  # every parent (inputs + explicit `after`), in file order
    overrides: list[str]  # the file's `set`, the stage's `set`, the command line's, then the wired parent exports
    resources: Resources
    kind: str = ""  # train.stage of the resolved config: names the export file

    @property
    def export(self) -> Path:
        return self.run_dir / "export" / f"{self.kind}.pt"

    def job(self) -> TrainJob:
        return TrainJob(self.config, self.overrides, self.run_dir)


@dataclass
class Pipeline:
    name: str
    source: Path
    stages: list[StageJob]  # parents before children

    def stage(self, name: str) -> StageJob:
        return next(s for s in self.stages if s.name == name)


@dataclass
class PlanEntry:
    """What a (re)run of the pipeline does with one stage."""

    stage: StageJob
    status: str  # done | queued | submit
    job_id: str = ""  # queued: the recorded job; submit: filled in once submitted
    after_jobs: list[str] = field(default_factory=list)
    executor: str = ""  # queued: where that job runs (slurm | local)


def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PipelineError(f"{where} must be a list of strings, got {value!r}")
    return list(value)


def _order(names: list[str], parents: dict[str, list[str]], src: str) -> list[str]:
    """Parents before children, otherwise file order; fails on a cycle."""
    done: list[str] = []
    state: dict[str, str] = {}

    def visit(n: str, path: tuple[str, ...]) -> None:
        if state.get(n) == "done":
            return
        if state.get(n) == "open":
            raise PipelineError(f"{src}: stages depend on each other in a cycle: {' -> '.join(path + (n,))}")
        state[n] = "open"
        for p in parents[n]:
            visit(p, path + (n,))
        state[n] = "done"
        done.append(n)

    for n in names:
        visit(n, ())
    return done


def load_pipeline(path: str | Path, run_root: Optional[str] = None, overrides: Sequence[str] = (),
                  resources: Optional[dict] = None, cwd: Optional[Path] = None) -> Pipeline:
    """Read and check a pipeline file; every stage config is loaded with its final overrides (errors name the
    stage). run_root (or the file's `run_root`): stage folders become ROOT/<stage>. resources: overrides for
    every stage (command-line flags)."""
    from asset_dist.config import ConfigError, load_config

    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{src}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{src}: top level must be a mapping")
    unknown = sorted(set(data) - set(PIPELINE_KEYS))
    if unknown:
        raise PipelineError(f"{src}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(PIPELINE_KEYS)})")
    stages_in = data.get("stages")
    if not isinstance(stages_in, dict) or not stages_in:
        raise PipelineError(f"{src}: 'stages' must map stage names to their settings")
    cwd = Path(cwd or Path.cwd())
    root = run_root if run_root is not None else data.get("run_root") or ""
    file_sets = _as_list(data.get("set"), f"{src}: 'set'")
    try:
        base_res = Resources.from_dict(data.get("resources") or {}, src=f"{src}: resources")
    except ValueError as e:
        raise PipelineError(str(e)) from None

    raw: dict[str, dict] = {}
    parents: dict[str, list[str]] = {}
    for name, spec in stages_in.items():
        where = f"{src}: stage '{name}'"
        if not isinstance(spec, dict):
            raise PipelineError(f"{where} must be a mapping")
        bad = sorted(set(spec) - set(STAGE_KEYS))
        if bad:
            raise PipelineError(f"{where}: unknown key(s) {', '.join(bad)} (allowed: {', '.join(STAGE_KEYS)})")
        if "config" not in spec:
            raise PipelineError(f"{where}: 'config' (the stage config file) is required")
        inputs = spec.get("inputs") or {}
        if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
            raise PipelineError(f"{where}: 'inputs' must map config keys to parent stage names")
        ps = list(dict.fromkeys(list(inputs.values()) + _as_list(spec.get("after"), f"{where}: 'after'")))
        for p in ps:
            if p not in stages_in:
                raise PipelineError(f"{where}: parent '{p}' is not a stage of this pipeline "
                                    f"(stages: {', '.join(stages_in)})")
        raw[name], parents[name] = spec, ps

    stages: dict[str, StageJob] = {}
    for name in _order(list(stages_in), parents, src):
        spec, where = raw[name], f"{src}: stage '{name}'"
        config = (path.parent / str(spec["config"])).resolve()
        if root:
            run_dir = cwd / root / name
        elif spec.get("run_dir"):
            run_dir = cwd / str(spec["run_dir"])
        else:
            raise PipelineError(f"{where}: 'run_dir' is required (or give the pipeline a run_root)")
        try:
            res = Resources.from_dict(spec.get("resources") or {}, base_res, src=f"{where}: resources")
            res = Resources.from_dict(resources or {}, res, src="command-line resources").check()
        except ValueError as e:
            raise PipelineError(str(e) if src in str(e) else f"{where}: {e}") from None
        # the file's `set`, then the stage's, then the command line's; the wired parent exports win over all
        sets = file_sets + _as_list(spec.get("set"), f"{where}: 'set'") + list(overrides)
        sets += [f"{key}={stages[parent].export}" for key, parent in spec.get("inputs", {}).items()]
        try:
            cfg = load_config(config, sets + [f"paths.run_dir={run_dir.resolve()}"])
        except ConfigError as e:
            raise PipelineError(f"{where}: {e}") from None
        stages[name] = StageJob(name=name, config=config, run_dir=run_dir.resolve(),
                                inputs=dict(spec.get("inputs", {})), after=parents[name], overrides=sets,
                                resources=res, kind=cfg.train.stage)
    exports = [s.export for s in stages.values()]
    if len(set(exports)) != len(exports):
        raise PipelineError(f"{src}: two stages write the same export; give each its own run_dir")
    return Pipeline(name=str(data.get("name") or path.stem), source=path.resolve(), stages=list(stages.values()))


def recorded_job(stage: StageJob) -> Optional[dict]:
    try:
        return json.loads((stage.run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None


def job_alive(rec: dict) -> bool:
    """Is a recorded job still queued or running? SLURM: slurmctld says so. Local: its controller process
    (the job id is its pid) still runs."""
    job_id = str(rec.get("job_id", ""))
    if rec.get("executor") == "slurm":
        return state_active(slurm_state(job_id))
    try:
        return b"submitit.local._local" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def plan(p: Pipeline, executor: str) -> list[PlanEntry]:
    """What each stage needs: done (export exists), queued (its recorded job is still queued or running) or
    submit. A queued SLURM job becomes a dependency of the stages after it."""
    steps: dict[str, PlanEntry] = {}
    for s in p.stages:
        if s.export.is_file():
            steps[s.name] = PlanEntry(s, "done")
            continue
        rec = recorded_job(s)
        if rec and job_alive(rec):
            steps[s.name] = PlanEntry(s, "queued", job_id=str(rec["job_id"]), executor=str(rec.get("executor")))
        else:
            steps[s.name] = PlanEntry(s, "submit")
        steps[s.name].after_jobs = [steps[a].job_id for a in s.after if steps[a].status == "queued"]
    return list(steps.values())


def blocked(steps: list[PlanEntry], executor: str) -> list[str]:
    """Stages still running in a way this run cannot wait for: any of them when running locally (one stage
    after the other), a local run when submitting to SLURM (afterok needs a SLURM job)."""
    return [f"{st.stage.name} ({st.executor} job {st.job_id})" for st in steps
            if st.status == "queued" and (executor == "local" or st.executor != "slurm")]


def describe(steps: list[PlanEntry], executor: str) -> str:
    lines = [f"{'stage':<10} {'status':<8} {'after':<24} {'resources':<34} run folder"]
    for st in steps:
        s, r = st.stage, st.stage.resources
        res = f"{r.nodes_spec}x{r.tasks} task(s), {r.gpus_per_node} GPU/node, {r.time}"
        status = st.status + (f" {st.job_id}" if st.status == "queued" else "")
        lines.append(f"{s.name:<10} {status:<8} {','.join(s.after) or '-':<24} {res:<34} {s.run_dir}")
    lines.append(f"(executor {executor}; done = RUN/export/<stage>.pt exists: skipped)")
    return "\n".join(lines)


def _record(stage: StageJob, job_id: str, executor: str, source: Path) -> None:
    from asset_dist.utils import atomic_write_json

    atomic_write_json(stage.run_dir / RECORD, {
        "job_id": job_id, "executor": executor, "stage": stage.name, "pipeline": str(source),
        "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def submit_slurm(p: Pipeline, steps: list[PlanEntry]) -> dict[str, str]:
    """Submit every 'submit' step with afterok on its parents' jobs; returns stage -> job id."""
    ids = {st.stage.name: st.job_id for st in steps if st.status == "queued"}
    for st in steps:
        if st.status != "submit":
            continue
        s = st.stage
        after = [ids[a] for a in s.after if a in ids]
        (job,) = submit_jobs([s.job()], s.resources, "slurm", name=f"{p.name}-{s.name}", after=after)
        ids[s.name] = st.job_id = str(job.job_id)
        _record(s, st.job_id, "slurm", p.source)
        print(f"{s.name}: submitted job {st.job_id}" + (f" (afterok:{':'.join(after)})" if after else "")
              + f", log {log_path(job)}", flush=True)
    return ids


def run_local(p: Pipeline, steps: list[PlanEntry]) -> bool:
    """Run the unfinished stages one after the other on this machine (submitit's local executor)."""
    busy = blocked(steps, "local")
    if busy:
        print(f"error: still running: {', '.join(busy)}; run again once it has finished", file=sys.stderr)
        return False
    for st in steps:
        s = st.stage
        if st.status == "done":
            print(f"{s.name}: done ({s.export}), skipped", flush=True)
            continue
        (job,) = submit_jobs([s.job()], s.resources, "local", name=f"{p.name}-{s.name}")
        _record(s, str(job.job_id), "local", p.source)
        print(f"{s.name}: running locally ({s.resources.tasks} process(es)), log {log_path(job)}", flush=True)
        ok, msg = wait_job(job)
        if ok and not s.export.is_file():
            ok, msg = False, f"finished without writing {s.export}"
        print(f"{s.name}: {msg}", flush=True)
        if not ok:
            later = [x.stage.name for x in steps[steps.index(st) + 1:] if x.status != "done"]
            print(f"error: stage {s.name} failed; not running what depends on it ({', '.join(later) or 'nothing'})."
                  " Fix it and run the same command again: finished stages are skipped.", file=sys.stderr)
            return False
    return True


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Submit the whole training chain as dependent jobs (afterok); each stage reads the "
                          "exports of its parents. Stages whose export exists are skipped.")
    parser.add_argument("--config", required=True, help="pipeline file, e.g. configs/pipelines/landscape.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every stage, e.g. --set data.train_shards=DIR (repeatable)")
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="slurm (dependent jobs), local (stage after stage on this machine), or auto")
    parser.add_argument("--run-root", default=None,
                        help="put every stage's run folder under this folder (ROOT/<stage>) instead of the file's")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    add_resource_args(parser, defaults=False)


def main(args: argparse.Namespace) -> int:
    # resource flags given on the command line override every stage's
    res_over = {f.name: getattr(args, f.name) for f in fields(Resources) if getattr(args, f.name, None) is not None}
    try:
        kind = resolve_executor(args.executor)
        p = load_pipeline(args.config, run_root=args.run_root, overrides=args.overrides, resources=res_over)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = plan(p, kind)
    print(f"pipeline {p.name} ({p.source}):")
    print(describe(steps, kind), flush=True)
    if args.dry_run:
        for st in steps:
            if st.status == "submit":
                print(f"{st.stage.name}: " + " ".join(st.stage.job().argv()))
        print("(dry run: nothing submitted)")
        return 0
    if all(st.status == "done" for st in steps):
        print("every stage is finished: nothing to submit")
        return 0
    if kind == "local":
        return 0 if run_local(p, steps) else 1
    busy = blocked(steps, kind)
    if busy:
        print(f"error: still running outside SLURM: {', '.join(busy)}; run again once it has finished",
              file=sys.stderr)
        return 1
    try:
        submit_slurm(p, steps)
    except Exception as e:  # noqa: BLE001 - sbatch refused (bad partition, account...): say which stage
        print(f"error: submission failed: {e}", file=sys.stderr)
        return 1
    print("submitted; watch with `squeue --me`; run the same command again to resume or skip finished stages")
    return 0
