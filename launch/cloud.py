"""Cloud TPU backends: ``gcloud compute tpus tpu-vm`` per run, and ``xpk workload create`` on GKE.

    python -m launch sweep experiments/NAME.py --backend tpu --zone us-central2-b \\
        --accelerator-type v4-8 --runtime-version tpu-ubuntu2204-base [--queued] [--spot] --dry-run
    python -m launch sweep experiments/NAME.py --backend xpk --cluster my-cluster --tpu-type v5litepod-16 \\
        --docker-image gcr.io/me/hybrids --max-restarts 3 --dry-run

Every command is a list of argv built by pure functions (tested for exact argv); ``--dry-run`` prints
them with ``shlex.join``. The remote command (what ``--worker=all`` / the XPK pod runs) is itself a
shell line, built by ``shlex.join`` of ``python -m launch.run_point ...`` with the point as one JSON
element, so no config value is ever interpreted by either shell. ``tpu``: per run, create a TPU VM
(or a queued resource with ``--queued``, waited for until ACTIVE), run the point on all workers over
ssh, delete the VM (``--keep-vm`` keeps it). ``xpk``: one workload per run, with ``--max-restarts``
so XPK restarts a preempted workload, which resumes from the run's checkpoint. The run directories
must be on storage the remote side writes and this side reads (``--remote-root``, e.g. a gcsfuse
mount); the repository must be at ``--remote-repo`` on the VM / in the image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import shlex
import subprocess
import time

from hybrids.config import ConfigError


@dataclasses.dataclass
class CloudOptions:
  zone: str | None = None
  project: str | None = None
  # tpu
  accelerator_type: str | None = None
  runtime_version: str = "tpu-ubuntu2204-base"
  spot: bool = False
  queued: bool = False
  keep_vm: bool = False
  # xpk
  cluster: str | None = None
  tpu_type: str | None = None
  num_slices: int = 1
  docker_image: str | None = None
  max_restarts: int = 2
  # both
  remote_repo: str | None = None
  remote_root: str | None = None
  python: str = "python3"
  name_prefix: str = ""

  def check(self, backend: str) -> None:
    """Missing required flags → ConfigError naming them, before anything runs."""
    required = {"tpu": ("zone", "accelerator_type"), "xpk": ("cluster", "tpu_type")}[backend]
    missing = [f"--{name.replace('_', '-')}" for name in required if not getattr(self, name)]
    if missing:
      raise ConfigError(f"--backend {backend} needs {' and '.join(missing)} "
                        f"(required for {backend}: {', '.join('--' + n.replace('_', '-') for n in required)})")
    if self.num_slices < 1 or self.max_restarts < 0:
      raise ConfigError(f"--num-slices={self.num_slices} must be ≥ 1 and --max-restarts={self.max_restarts} ≥ 0")


def resource_name(run_id: str, prefix: str = "", max_len: int = 63) -> str:
  """A GCE / Kubernetes-safe name: lowercase letters, digits, '-', starting with a letter."""
  name = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}{run_id}".lower()).strip("-")
  if not name or not name[0].isalpha():
    name = "h-" + name
  if len(name) > max_len:  # keep the hash at the end: it is what makes the name unique
    name = name[:max_len - 11].rstrip("-") + "-" + name[-10:]
  return name


def remote_command(experiment: str, point: dict, workdir: str, *, backend: str, python: str = "python3",
                   repo: str | None = None) -> str:
  """The shell line run remotely: ``cd REPO && python3 -m launch.run_point ...``, every value quoted."""
  argv = [python, "-m", "launch.run_point", "--experiment", experiment, "--point-json",
          json.dumps(point, sort_keys=True), "--workdir", workdir, "--backend", backend]
  line = shlex.join(argv)
  return f"cd {shlex.quote(repo)} && {line}" if repo else line


def _gcloud_scope(opts: CloudOptions) -> list[str]:
  return [f"--zone={opts.zone}"] + ([f"--project={opts.project}"] if opts.project else [])


def tpu_commands(experiment: str, run_id: str, point: dict, workdir: str, opts: CloudOptions) -> dict[str, list[str]]:
  """``{"create", ["wait",] "run", "delete"}`` argv lists for one run on its own TPU VM / slice."""
  name = resource_name(run_id, opts.name_prefix)
  scope = _gcloud_scope(opts)
  cmds: dict[str, list[str]] = {}
  if opts.queued:
    cmds["create"] = ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}", *scope,
                      f"--accelerator-type={opts.accelerator_type}", f"--runtime-version={opts.runtime_version}",
                      *(["--spot"] if opts.spot else [])]
    # Polled until it prints ACTIVE: a queued slice is granted later.
    cmds["wait"] = ["gcloud", "compute", "tpus", "queued-resources", "describe", name, *scope,
                    "--format=value(state.state)"]
  else:
    cmds["create"] = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *scope,
                      f"--accelerator-type={opts.accelerator_type}", f"--version={opts.runtime_version}",
                      *(["--spot"] if opts.spot else [])]
  command = remote_command(experiment, point, workdir, backend="tpu", python=opts.python,
                           repo=opts.remote_repo or "hybrids")
  cmds["run"] = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *scope, "--worker=all", f"--command={command}"]
  if opts.queued:
    cmds["delete"] = ["gcloud", "compute", "tpus", "queued-resources", "delete", name, *scope, "--force", "--quiet"]
  else:
    cmds["delete"] = ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *scope, "--quiet"]
  return cmds


def xpk_command(experiment: str, run_id: str, point: dict, workdir: str, opts: CloudOptions) -> list[str]:
  """``xpk workload create`` argv for one run; XPK restarts it up to ``--max-restarts`` times."""
  command = remote_command(experiment, point, workdir, backend="xpk", python=opts.python, repo=opts.remote_repo)
  return ["xpk", "workload", "create", f"--cluster={opts.cluster}",
          f"--workload={resource_name(run_id, opts.name_prefix, max_len=40)}", f"--tpu-type={opts.tpu_type}",
          f"--num-slices={opts.num_slices}", *([f"--docker-image={opts.docker_image}"] if opts.docker_image else []),
          f"--max-restarts={opts.max_restarts}", *([f"--project={opts.project}"] if opts.project else []),
          *([f"--zone={opts.zone}"] if opts.zone else []), f"--command={command}"]


def plan(backend: str, experiment: str, todo: list[dict], opts: CloudOptions) -> list[tuple[dict, dict[str, list[str]]]]:
  """``[(row, {step: argv})]`` for every run to launch; ``row["remote_workdir"]`` is where it writes."""
  out = []
  for row in todo:
    workdir = row["remote_workdir"]
    if backend == "tpu":
      out.append((row, tpu_commands(experiment, row["run"], row["point"], workdir, opts)))
    else:
      out.append((row, {"create": xpk_command(experiment, row["run"], row["point"], workdir, opts)}))
  return out


def print_plan(planned) -> None:
  for row, cmds in planned:
    print(f"# {row['run']}  {json.dumps(row['point'], sort_keys=True)}")
    for step, argv in cmds.items():
      if step == "wait":
        print(f"# wait until this prints ACTIVE: {shlex.join(argv)}")
      else:
        print(shlex.join(argv))


def _run_tpu(row: dict, cmds: dict[str, list[str]], opts: CloudOptions, poll_s: float) -> int:
  created = False
  try:
    subprocess.run(cmds["create"], check=True)
    created = True
    if "wait" in cmds:
      while True:
        state = subprocess.run(cmds["wait"], check=True, capture_output=True, text=True).stdout.strip()
        if state == "ACTIVE":
          break
        if state in ("FAILED", "SUSPENDED"):
          raise RuntimeError(f"queued resource for {row['run']} is {state}")
        time.sleep(poll_s)
    return subprocess.run(cmds["run"]).returncode
  finally:
    if created and not opts.keep_vm:
      subprocess.run(cmds["delete"])


def execute(backend: str, planned, opts: CloudOptions, *, max_parallel: int | None = None, poll_s: float = 30.0) -> int:
  """Run the planned commands (no shell); returns the number of runs whose commands failed."""
  failed = 0
  if backend == "xpk":
    for row, cmds in planned:
      if subprocess.run(cmds["create"]).returncode != 0:
        print(f"[launch] xpk workload for {row['run']} was not created", flush=True)
        failed += 1
    return failed
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_parallel or len(planned), len(planned) or 1))) as pool:
    futures = {pool.submit(_run_tpu, row, cmds, opts, poll_s): row for row, cmds in planned}
    for future in concurrent.futures.as_completed(futures):
      row = futures[future]
      try:
        code = future.result()
      except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
        print(f"[launch] {row['run']}: {e}", flush=True)
        code = 1
      failed += code != 0
      print(f"[launch] {row['run']}: remote run exited {code}", flush=True)
  return failed
