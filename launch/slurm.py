"""SLURM backend: one submitit job array per launch, one array task per pending point.

    python -m launch sweep experiments/NAME.py --backend slurm --max-parallel 8 \\
        --slurm-partition gpu --slurm-gpus-per-node 1 --slurm-time-min 240

Each task runs :class:`SlurmPoint`, a ``submitit.helpers.Checkpointable``: on SIGUSR2 (SLURM's
warning before the time limit, ``--signal=USR2@90`` as submitit sets it, or a preemption sent as
``scancel --signal=USR2 JOBID``) it asks training to stop — the same request SIGTERM makes — so the
loop saves a checkpoint at the next step boundary; then submitit's own handler takes over:
``checkpoint()`` returns a ``DelayedSubmission`` of a fresh ``SlurmPoint`` for the same run, the job is
requeued with ``scontrol requeue`` and, when it starts again, training resumes from that checkpoint.
A plain SIGTERM (preemption with ``PreemptMode=REQUEUE``, ``scontrol requeue``) also checkpoints; SLURM
requeues the job itself. Per-run logs: submitit writes ``ROOT/.submitit/<job>_log.{out,err}``;
each run's ``launch.json`` records, per attempt, the job id and those paths.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from launch import run_point, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpointable_base():
  try:
    import submitit
  except ImportError:  # lets this module import (and --dry-run print) without submitit
    return object
  return submitit.helpers.Checkpointable


class SlurmPoint(_checkpointable_base()):
  """The callable of one array task: trains one point, checkpointing and requeueing on SIGUSR2."""

  def __init__(self, experiment: str, point: dict, workdir: str, run_id: str):
    self.experiment, self.point, self.workdir, self.run_id = experiment, point, workdir, run_id
    self._preempted = False

  def _on_preemption(self, signum, frame):
    self._preempted = True
    stop_training = signal.getsignal(signal.SIGTERM)  # training's handler while it runs, else submitit's log
    if callable(stop_training):
      stop_training(signal.SIGTERM, frame)

  def __call__(self) -> str:
    import submitit

    env = submitit.JobEnvironment()
    submitit_handler = signal.getsignal(signal.SIGUSR2)  # installed by submitit before calling us
    self._preempted = False
    signal.signal(signal.SIGUSR2, self._on_preemption)
    try:
      code, summary = run_point.execute(
          self.experiment, self.point, self.workdir, run_id=self.run_id, lock_wait_s=60.0, backend="slurm",
          job_id=str(env.job_id), log=str(env.paths.stdout).replace("%t", "0"))
    finally:
      signal.signal(signal.SIGUSR2, submitit_handler)
    sys.stdout.flush()
    if self._preempted and summary.get("status") == "interrupted" and callable(submitit_handler):
      submitit_handler(signal.SIGUSR2, None)  # checkpoint() → requeue → exit; does not return
    if code not in (run_point.EXIT_DONE, run_point.EXIT_INTERRUPTED, run_point.EXIT_BUSY):
      raise RuntimeError(f"{self.run_id} ended with exit status {code} ({summary.get('status', 'no summary')}); "
                         f"see {self.workdir}/launch.json and this job's log")
    return summary.get("status", "busy")

  def checkpoint(self, *args, **kwargs):
    """What submitit requeues: a fresh callable for the same run (training state lives in the run dir)."""
    import submitit
    return submitit.helpers.DelayedSubmission(SlurmPoint(self.experiment, self.point, self.workdir, self.run_id))


def executor_parameters(args, name: str, num_tasks: int) -> dict:
  """``AutoExecutor.update_parameters`` keywords from the CLI's ``--slurm-*`` flags."""
  params = {
      "name": name,
      "timeout_min": args.slurm_time_min,
      "slurm_array_parallelism": min(args.max_parallel or num_tasks, max(num_tasks, 1)),
      "slurm_signal_delay_s": args.slurm_signal_delay_s,
      # The job runs `python -m submitit.core._submit` with this interpreter; it must import launch.
      "slurm_setup": [f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"],
  }
  for flag, key in (("slurm_partition", "slurm_partition"), ("slurm_cpus_per_task", "cpus_per_task"),
                    ("slurm_gpus_per_node", "gpus_per_node"), ("slurm_mem_gb", "mem_gb")):
    if getattr(args, flag) is not None:
      params[key] = getattr(args, flag)
  extra = {}
  for text in args.slurm_param or ():
    key, sep, value = text.partition("=")
    if not sep or not key:
      from hybrids.config import ConfigError
      raise ConfigError(f"--slurm-param {text!r}: expected KEY=VALUE (an sbatch option, e.g. qos=high)")
    extra[key] = value
  if extra:
    params["slurm_additional_parameters"] = extra
  check_script_values(params)
  if getattr(args, "root", None):
    check_script_values(os.path.abspath(args.root), "--root")  # submitit's log paths: #SBATCH --output / --error
  return params


def _control_characters(text: str) -> list[str]:
  import unicodedata
  return sorted({repr(c) for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")})


def check_script_values(value, where: str = "SLURM parameters") -> None:
  """Refuse control characters (newline, carriage return, NUL, tab, …) in any key or value that reaches
  the job script: a newline inside an ``#SBATCH`` line ends it and turns the rest into script lines
  (and sbatch stops reading options at the first non-``#SBATCH`` line, dropping ``--signal``)."""
  from hybrids.config import ConfigError

  if isinstance(value, dict):
    for k, v in value.items():
      check_script_values(k, f"{where} key")
      check_script_values(v, f"{where}[{k!r}]")
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      check_script_values(v, f"{where}[{i}]")
  elif isinstance(value, str) and _control_characters(value):
    raise ConfigError(f"{where}: {value!r} holds control characters ({', '.join(_control_characters(value))}); "
                      "they would break the job script's lines")


def submit(experiment: str, root: str, todo: list[dict], params: dict) -> list[tuple[dict, str, str]]:
  """Submit ``todo`` as one job array; returns ``[(row, job id, stdout log)]``."""
  import submitit

  check_script_values(params)
  check_script_values(os.path.abspath(root), "the sweep root")  # it lands in #SBATCH --output / --error
  # submitit's folder holds the pickles every job unpickles and runs: private to us (0700).
  folder = runs.private_dir(os.path.join(os.path.abspath(root), ".submitit"))
  executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster="slurm")
  executor.update_parameters(**params)
  experiment_abs = _absolute_spec(experiment)
  with executor.batch():
    jobs = [executor.submit(SlurmPoint(experiment_abs, row["point"], os.path.abspath(row["workdir"]), row["run"]))
            for row in todo]
  out = []
  for row, job in zip(todo, jobs):
    log = str(job.paths.stdout)
    os.makedirs(row["workdir"], exist_ok=True)
    with open(os.path.join(row["workdir"], runs.LOG_FILE), "a") as f:
      f.write(f"# {runs.now_iso()} submitted as SLURM job {job.job_id}; log: {log}\n")
    out.append((row, job.job_id, log))
  return out


def _absolute_spec(experiment: str) -> str:
  path, sep, arg = experiment.partition(":")
  return os.path.abspath(path) + (f":{arg}" if sep else "")
