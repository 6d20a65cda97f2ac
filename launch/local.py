"""Local backend: one ``python -m launch.run_point`` subprocess per point, in parallel over accelerators.

    python -m launch sweep experiments/quickstart.py --backend local [--max-parallel N] [--runs-per-device N]

With more than one local GPU (or TPU chip) each subprocess sees one device group
(``CUDA_VISIBLE_DEVICES`` / ``TPU_VISIBLE_CHIPS``, ``--devices-per-run`` devices each); on CPU the
points run one after another unless ``--max-parallel N`` asks for N at once.

``--runs-per-device N`` packs N runs onto each device group (small models use a fraction of a GPU):
groups × N subprocesses at once (at most ``--max-parallel``). On GPU each packed child gets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.9/N (unless that
variable is already set), so the N processes' JAX allocators fit one card; each CUDA context (~0.5 GB)
comes on top. Without MPS the processes time-share the GPU; ``--mps`` runs them as clients of a CUDA
MPS daemon (:class:`Mps`: one the user runs, else one started for the sweep and stopped after it), so
their kernels overlap (H100, Zoology's ``small`` grid: 8 packed under MPS gave 5.4× the points per
hour of one at a time; README "Sweeps"). TPU chips admit one process each, so N > 1 is refused there. On CPU (one "device") N runs at once, like
``--max-parallel N`` (which wins when both are given). A packed run computes exactly what it computes
alone: it is the same process with the same config, only scheduled beside others. Devices are counted
without initialising JAX here (``nvidia-smi``, ``/dev/accel*``), so the parent never holds GPU memory
a child needs. A live table (rich when installed and on a terminal, else one line per change) shows
each run's status, step and loss from its run directory. Ctrl-C or SIGTERM sends SIGTERM to every
child — each saves a checkpoint and exits — and children also get SIGTERM if this process dies
(``PR_SET_PDEATHSIG``), so a killed sweep loses at most the steps since their last save.
Each run's output goes to ``RUN/launch.log``.

``--lr-group G`` (``launch sweep``) trains up to G points that differ only in ``train.lr`` (and resume
from the same step) as one lockstep group in one process (``hybrids.train.train_group``): the model is
built once and the members step together, their parameters stacked under ``jax.vmap``. A group fills
one slot; its output goes to its first member's ``launch.log``, and each other member's log says where.
"""

from __future__ import annotations

import ctypes
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

from launch import runs

# A relaunch may find a killed sweep's child still writing its SIGTERM checkpoint; wait that long.
LOCK_WAIT_S = 120.0
TERMINATE_GRACE_S = 60.0
TIME_LIMIT = "time limit"  # what stopped the sweep, beside a signal number
TIME_LIMIT_EXIT = 3  # launch sweep's exit status when --time-limit stopped it (130: a signal)
PROGRESS_EVERY_S = 60.0
MAX_RUNS_PER_DEVICE = 64
# The share of a GPU's memory the N packed processes' allocators may take together; the rest is for
# their CUDA contexts and the driver.
PACKED_MEMORY_SHARE = 0.9


def run_point_argv(experiment: str, point: dict, workdir: str, *, python: str | None = None,
                   extra: tuple[str, ...] = (), members: tuple[tuple[dict, str], ...] = ()) -> list[str]:
  """The argv that trains one point (with ``members``, ``(point, workdir)`` pairs, a lockstep group led
  by it); every point is one JSON argv element, never shell text."""
  more = [arg for p, w in members for arg in ("--point-json", json.dumps(p, sort_keys=True), "--workdir", w)]
  return [python or sys.executable, "-m", "launch.run_point", "--experiment", experiment,
          "--point-json", json.dumps(point, sort_keys=True), "--workdir", workdir, *more, *extra]


def unit_argv(experiment: str, unit: list[dict], *, extra: tuple[str, ...] = ()) -> list[str]:
  """:func:`run_point_argv` for a unit of todo rows (one run, or a lockstep group; a group whose rows
  say ``"cell_stop"`` stops when one member passes ``train.stop_at_accuracy``: ``launch sweep --cell-stop``)."""
  members = {"members": tuple((r["point"], r["workdir"]) for r in unit[1:])} if unit[1:] else {}
  extra = (*extra, "--cell-stop") if unit[1:] and all(r.get("cell_stop") for r in unit) else extra
  return run_point_argv(experiment, unit[0]["point"], unit[0]["workdir"], extra=extra, **members)


_SMI_FAILURES_SHOWN: set[str] = set()  # detect_devices names each nvidia-smi failure once per process


def detect_devices(environ=None) -> tuple[str, list[str]]:
  """``(platform, device ids)`` of this host's accelerators, without initialising JAX.

  ``JAX_PLATFORMS=cpu`` (as in the tests) means CPU; a set ``CUDA_VISIBLE_DEVICES`` is taken as the
  GPUs to use; otherwise ``nvidia-smi -L`` counts GPUs and ``/dev/accel*`` / ``/dev/vfio/N`` TPU chips.
  An ``nvidia-smi`` that fails or times out is named on stderr when the host is then taken as CPU-only.
  """
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and platforms.split(",")[0] == "cpu":
    return "cpu", []
  if environ.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
    return "gpu", [d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
  smi_failure = ""  # nvidia-smi is there but failed: a broken driver, not a CPU host
  if shutil.which("nvidia-smi"):
    try:
      result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
      listing = result.stdout
      if result.returncode != 0:
        smi_failure = f"exit {result.returncode}: {' '.join((result.stderr or result.stdout).split())[-200:]}"
    except (OSError, subprocess.SubprocessError) as e:
      listing, smi_failure = "", f"{type(e).__name__}: {e}"
    gpus = [line for line in listing.splitlines() if line.startswith("GPU ")]
    if gpus:
      return "gpu", [str(i) for i in range(len(gpus))]
  chips = sorted(glob.glob("/dev/accel[0-9]*")) or sorted(p for p in glob.glob("/dev/vfio/*") if p[-1].isdigit())
  if chips:
    return "tpu", [str(i) for i in range(len(chips))]
  if smi_failure and smi_failure not in _SMI_FAILURES_SHOWN:  # one line per process, however often asked
    _SMI_FAILURES_SHOWN.add(smi_failure)
    print(f"launch: `nvidia-smi -L` failed ({smi_failure}); the sweep treats this host as CPU-only (no device "
          "pinned per run; set CUDA_VISIBLE_DEVICES to name the GPUs)", file=sys.stderr)
  return "cpu", []


def device_groups(devices: list[str], per_run: int) -> list[list[str]]:
  """Consecutive groups of ``per_run`` devices (a remainder too small for a run is left idle)."""
  if per_run < 1:
    raise ValueError(f"--devices-per-run={per_run} must be ≥ 1")
  return [devices[i:i + per_run] for i in range(0, len(devices) - per_run + 1, per_run)]


def parse_runs_per_device(value, platform: str | None = None) -> int:
  """``--runs-per-device``: a positive int ≤ MAX_RUNS_PER_DEVICE; N > 1 is refused on TPU (ValueError)."""
  try:
    n = int(str(value).strip())
  except ValueError:
    raise ValueError(f"--runs-per-device={value!r} must be an integer from 1 to {MAX_RUNS_PER_DEVICE}") from None
  if not 1 <= n <= MAX_RUNS_PER_DEVICE:
    raise ValueError(f"--runs-per-device={n} must be from 1 to {MAX_RUNS_PER_DEVICE}")
  if n > 1 and platform == "tpu":
    raise ValueError(f"--runs-per-device={n}: a TPU chip admits one process at a time, so runs cannot be "
                     "packed onto it; use --runs-per-device 1")
  return n


class MpsError(RuntimeError):
  """``--mps`` cannot serve the packed runs here (the daemon does not start, or serves no client)."""


class Mps:
  """A CUDA MPS control daemon for the packed runs of one sweep (``--mps``).

  :meth:`check` refuses, in one line, what MPS cannot serve (not a GPU host, one run per device, no
  ``nvidia-cuda-mps-control``) before anything is written. :meth:`start` uses a daemon that is already
  listening (``$CUDA_MPS_PIPE_DIRECTORY``, else ``/tmp/nvidia-mps``) or starts one with its pipe and log
  directories in a fresh temporary directory; :meth:`env` is what a child needs to reach it;
  :meth:`stop` quits only a daemon started here. ``note`` says which, for the launch log.
  """

  CONTROL = "nvidia-cuda-mps-control"
  DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
  START_TIMEOUT_S = 30.0
  # A client that must see the GPU through the daemon before any run starts: a daemon can start and
  # still serve no client (on one H200 host every packed run failed with "no supported devices found
  # for platform CUDA"), and each run would then fail alone and count as a failed attempt.
  PROBE = (sys.executable, "-c", "import jax; jax.devices('gpu')")
  PROBE_TIMEOUT_S = 180.0

  def __init__(self, environ=None):
    self.environ = dict(os.environ if environ is None else environ)
    self.pipe_dir: str | None = None
    self.log_dir: str | None = None
    self.owned: str | None = None  # the temporary directory of a daemon started here
    self.note = "off"

  @classmethod
  def check(cls, platform: str, runs_per_device: int) -> None:
    if platform != "gpu":
      raise ValueError(f"--mps needs NVIDIA GPUs (this host: {platform}); drop --mps")
    if runs_per_device < 2:
      raise ValueError("--mps shares a GPU between packed runs: give --runs-per-device N ≥ 2, or drop --mps")
    if shutil.which(cls.CONTROL) is None:
      raise ValueError(f"--mps: {cls.CONTROL} is not on PATH (it comes with the NVIDIA driver); drop --mps")

  def _listening(self, pipe_dir: str) -> bool:
    return os.path.exists(os.path.join(pipe_dir, "control"))

  def start(self) -> "Mps":
    import tempfile
    pipe_dir = self.environ.get("CUDA_MPS_PIPE_DIRECTORY") or self.DEFAULT_PIPE_DIRECTORY
    if self._listening(pipe_dir):
      self.pipe_dir, self.log_dir = pipe_dir, self.environ.get("CUDA_MPS_LOG_DIRECTORY")
      self.note = f"on (the daemon already listening at {pipe_dir})"
      self._probe()
      return self
    self.owned = tempfile.mkdtemp(prefix="hybrids-mps-")
    self.pipe_dir, self.log_dir = os.path.join(self.owned, "pipe"), os.path.join(self.owned, "log")
    os.makedirs(self.pipe_dir)
    os.makedirs(self.log_dir)
    result = subprocess.run([self.CONTROL, "-d"], env={**self.environ, **self.env()}, capture_output=True,
                            text=True, timeout=self.START_TIMEOUT_S)
    deadline = time.monotonic() + self.START_TIMEOUT_S
    while result.returncode == 0 and not self._listening(self.pipe_dir) and time.monotonic() < deadline:
      time.sleep(0.1)
    if result.returncode != 0 or not self._listening(self.pipe_dir):
      shutil.rmtree(self.owned, ignore_errors=True)
      self.owned = None
      raise MpsError(f"--mps: `{self.CONTROL} -d` did not start a daemon (exit {result.returncode}: "
                         f"{(result.stderr or result.stdout).strip()[:200]})")
    self.note = f"on (a daemon started for this sweep at {self.pipe_dir})"
    self._probe()
    return self

  def _probe(self) -> None:
    """Refuse, in one line, a daemon through which a CUDA client cannot reach the GPU."""
    env = {**self.environ, **self.env(), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
      result = subprocess.run(self.PROBE, env=env, capture_output=True, text=True, timeout=self.PROBE_TIMEOUT_S)
      failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip().splitlines()[-1:]
    except (OSError, subprocess.TimeoutExpired) as e:
      failure = [f"{type(e).__name__}: {e}"]
    if failure is None:
      return
    where, daemon_said = self.pipe_dir, self._last_log_line()
    self.stop()
    reason = failure[0][:200] if failure else "no output"
    daemon_said = f"; the daemon's log: {daemon_said[:200]}" if daemon_said else ""
    raise MpsError(f"--mps: a CUDA client cannot reach the GPU through the MPS daemon at {where} ({reason}"
                   f"{daemon_said}); run without --mps (the packed runs then time-share the GPU)")

  def _last_log_line(self) -> str:
    """The last line the MPS server (else the control daemon) logged: it says why no client was served,
    where the client itself only says it found no device."""
    if not self.log_dir:  # a daemon found running with no log directory named: not ours to guess
      return ""
    for name in ("server.log", "control.log"):
      try:
        with open(os.path.join(self.log_dir, name), errors="replace") as f:
          lines = [line.strip() for line in f if line.strip()]
      except OSError:
        continue
      if lines:
        return lines[-1]
    return ""

  def env(self) -> dict[str, str]:
    if self.pipe_dir is None:
      return {}
    return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, **({"CUDA_MPS_LOG_DIRECTORY": self.log_dir} if self.log_dir else {})}

  def stop(self) -> None:
    if self.owned is None:
      return
    try:
      subprocess.run([self.CONTROL], input="quit\n", env={**self.environ, **self.env()}, capture_output=True,
                     text=True, timeout=self.START_TIMEOUT_S)
    finally:
      shutil.rmtree(self.owned, ignore_errors=True)
      self.owned = None


def memory_fraction(runs_per_device: int) -> str:
  """``XLA_PYTHON_CLIENT_MEM_FRACTION`` of each of N runs packed on one GPU, e.g. ``"0.225"`` for N=4."""
  return f"{math.floor(PACKED_MEMORY_SHARE / runs_per_device * 1000) / 1000:.3f}"


def plan_slots(platform: str, devices: list[str], *, devices_per_run: int = 1, runs_per_device: int = 1,
               max_parallel: int | None = None, n_runs: int | None = None) -> list[list[str] | None]:
  """The device group of each concurrent slot (None: the child keeps the parent's devices).

  Several local GPUs / TPU chips: ``runs_per_device`` slots per group of ``devices_per_run`` devices,
  interleaved so that the first slots go to distinct groups, at most ``max_parallel``. One GPU / chip:
  ``runs_per_device`` slots, at most ``max_parallel``. CPU: ``max_parallel`` slots if given, else
  ``runs_per_device``. At most ``n_runs``, at least one.
  """
  if platform != "cpu" and len(devices) > 1:
    groups = device_groups(devices, devices_per_run)
    if not groups:
      raise ValueError(f"--devices-per-run={devices_per_run} exceeds the {len(devices)} local {platform} devices")
    slots: list[list[str] | None] = [groups[i % len(groups)] for i in range(len(groups) * runs_per_device)]
    if max_parallel:
      slots = slots[:max_parallel]
  elif platform != "cpu" and max_parallel:
    slots = [None] * min(max_parallel, runs_per_device)  # one device: it takes N runs, no more
  else:
    slots = [None] * (max_parallel or runs_per_device)
  return slots[:max(1, n_runs)] if n_runs is not None else slots


def child_env(platform: str, group: list[str] | None, slot: int, base=None, *,
              runs_per_device: int = 1) -> dict[str, str]:
  """The environment of the subprocess that uses device ``group`` (None: all / CPU)."""
  env = dict(os.environ if base is None else base)
  env[runs.RUNS_PER_DEVICE_ENV] = str(runs_per_device)  # recorded in the run's attempt: its device share
  if platform == "gpu" and runs_per_device > 1:
    # Grow on demand, within a 1/N share: N processes fit one card (a value the user set wins).
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", memory_fraction(runs_per_device))
  if group is None:
    return env
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
  elif platform == "tpu":
    # One chip per process, non-communicating processes (Cloud TPU's documented recipe).
    env.update({"TPU_VISIBLE_CHIPS": ",".join(group), "TPU_VISIBLE_DEVICES": ",".join(group),
                "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_PROCESS_PORT": str(8476 + slot), "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{8476 + slot}",
                "TPU_MESH_CONTROLLER_PORT": str(8476 + slot)})
  return env


def _die_with_parent():
  """preexec_fn: the child gets SIGTERM (→ checkpoint) when the launching process dies."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    pass


class StatusDisplay:
  """The live table: rich on a terminal, else a line whenever a run changes status."""

  def __init__(self, rows: list[dict], live: bool):
    self.rows = rows
    self.seen: dict[str, str] = {}
    self.printed: dict[str, float] = {}
    self.live = None
    if live and sys.stdout.isatty():
      try:
        from rich.live import Live
        self.live = Live(self._rich_table(), refresh_per_second=2, transient=False)
        self.live.__enter__()
      except ImportError:
        self.live = None

  def _rich_table(self):
    from rich.table import Table

    from launch import status as status_lib
    table = Table(title="sweep")
    for name in status_lib.COLUMNS:
      table.add_column(name)
    for row in status_lib.table_rows(self.rows):
      table.add_row(*row)
    return table

  def update(self) -> None:
    from launch import status as status_lib
    for row in self.rows:
      row.update(runs.run_state(row["workdir"]))
    if self.live is not None:
      self.live.update(self._rich_table())
      return
    now = time.monotonic()
    for row in self.rows:
      # A line when the status changes, and a progress line at most every PROGRESS_EVERY_S while running.
      changed = self.seen.get(row["run"]) != row["status"]
      due = row["status"] == "running" and now - self.printed.get(row["run"], 0.0) >= PROGRESS_EVERY_S
      if changed or due:
        self.seen[row["run"]] = row["status"]
        self.printed[row["run"]] = now
        print(f"[launch] {row['run']}: {status_lib.describe(row)}", flush=True)

  def close(self) -> None:
    if self.live is not None:
      self.live.__exit__(None, None, None)


def run(experiment: str, todo: list[dict], *, max_parallel: int | None = None, devices_per_run: int = 1,
        runs_per_device: int = 1, mps: bool = False, live: bool = True, poll_s: float = 0.5,
        detected: tuple[str, list[str]] | None = None, units: list[list[dict]] | None = None,
        decided=None, time_limit_s: float | None = None) -> int:
  """Train every ``todo`` row (``{"run", "point", "workdir"}``) in subprocesses; returns 0, 130 if stopped
  by a signal, :data:`TIME_LIMIT_EXIT` if stopped by ``time_limit_s``.

  Rows are updated in place with each run's final state. ``mps``: the packed runs are clients of a
  CUDA MPS daemon (:class:`Mps`). ``detected``: :func:`detect_devices`' answer if the caller has it.
  ``units``: the rows of ``todo`` partitioned into lockstep groups (:func:`lr_groups`), one process
  each; default, one process per row. ``decided`` (``launch sweep --cell-stop``): run id → why its
  cell needs it no more, or None; checked as each unit is dispatched (the out-of-memory retries too),
  so a cell decided while the sweep runs launches none of its queued runs. A running group stops with
  its cell only when the decider is one of its members: runs of the cell training in other processes
  go on to their own ends. ``time_limit_s`` (``launch sweep --time-limit``): that many seconds after the
  start, the sweep stops as on Ctrl-C (no new runs; the running ones get SIGTERM and checkpoint at
  their next step), for slots of GPU time that end at a known moment.
  """
  platform, devices = detected or detect_devices()
  runs_per_device = parse_runs_per_device(runs_per_device, platform)
  daemon = Mps()
  if mps:
    Mps.check(platform, runs_per_device)
    daemon.start()
  try:
    return _run(experiment, todo, platform, devices, daemon, max_parallel=max_parallel,
                devices_per_run=devices_per_run, runs_per_device=runs_per_device, live=live, poll_s=poll_s,
                units=units, decided=decided, time_limit_s=time_limit_s)
  finally:
    daemon.stop()


def _run(experiment: str, todo: list[dict], platform: str, devices: list[str], daemon: Mps, *,
         max_parallel: int | None, devices_per_run: int, runs_per_device: int, live: bool, poll_s: float,
         units: list[list[dict]] | None = None, decided=None, time_limit_s: float | None = None) -> int:
  deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
  units = units if units is not None else [[row] for row in todo]
  slot_groups = plan_slots(platform, devices, devices_per_run=devices_per_run, runs_per_device=runs_per_device,
                           max_parallel=max_parallel, n_runs=len(units))
  slots = len(slot_groups)
  packing = f"runs-per-device {runs_per_device}"
  if platform == "gpu" and runs_per_device > 1:
    env = child_env(platform, None, 0, runs_per_device=runs_per_device)
    packing += f", XLA_PYTHON_CLIENT_MEM_FRACTION={env['XLA_PYTHON_CLIENT_MEM_FRACTION']} each, MPS {daemon.note}"
  groups = [g for i, g in enumerate(slot_groups) if g is not None and g not in slot_groups[:i]]
  where = f"on {platform} device groups {groups}" if groups else f"({platform})"
  grouped = f" in {len(units)} lockstep group(s)" if len(units) < len(todo) else ""
  print(f"[launch] local: {len(todo)} run(s){grouped}, {slots} at a time {where}; {packing}", flush=True)

  display = StatusDisplay(todo, live)
  queue = list(units)
  active: dict[int, tuple[subprocess.Popen, list[dict], object]] = {}  # slot → (process, its rows, log file)
  packed = platform == "gpu" and runs_per_device > 1
  # Runs that ran out of memory beside packed runs: each is retried once with the GPUs to itself (the
  # other slots drain first and wait), since its share of memory, not the run, was what failed.
  alone: list[list[dict]] = []
  retried_alone: set[str] = set()
  solo: int | None = None  # the slot of the run that has the GPUs to itself, while it runs
  log_start: dict[str, int] = {}  # run → where this attempt's output starts in its launch.log
  stop = {"signum": None}

  def on_signal(signum, frame):
    stop["signum"] = signum
    for proc, _, _ in list(active.values()):  # at once: each run checkpoints at its next step
      if proc.poll() is None and not getattr(proc, "_launch_terminated", False):
        proc._launch_terminated = True
        proc.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    while ((queue or alone) and stop["signum"] is None) or active:
      if deadline is not None and stop["signum"] is None and time.monotonic() >= deadline:
        print(f"[launch] --time-limit {time_limit_s:g} s reached: stopping; the running runs checkpoint", flush=True)
        on_signal(TIME_LIMIT, None)
      for slot in range(slots):
        if slot in active or stop["signum"] is not None:
          continue
        if alone:
          if active:  # the GPUs drain before a run that needs them to itself
            break
          unit, share, solo = _undecided(alone.pop(0), decided), 1, slot
          if not unit:
            solo = None
            continue
        elif queue and solo is None:
          unit, share = _undecided(queue.pop(0), decided), runs_per_device
          if not unit:
            continue
        else:
          continue
        row = unit[0]  # a group's output goes to its first member's log
        for member in unit:
          os.makedirs(member["workdir"], exist_ok=True)
        log = open(os.path.join(row["workdir"], runs.LOG_FILE), "a")
        log_start[row["run"]] = log.tell()
        argv = unit_argv(experiment, unit, extra=("--lock-wait", str(LOCK_WAIT_S), "--backend", "local"))
        env = {**child_env(platform, slot_groups[slot], slot, runs_per_device=share), **daemon.env()}
        group = f", a lockstep group of {len(unit)}: {' '.join(m['run'] for m in unit)}" if len(unit) > 1 else ""
        log.write(f"\n# {runs.now_iso()} {' '.join(argv[:3])} … (slot {slot}, {_placement(slot_groups[slot])}, "
                  f"runs-per-device {share}, mem fraction {_mem_fraction(env)}, MPS {daemon.note}"
                  f"{', retried alone after running out of memory beside packed runs' if share == 1 and packed else ''}"
                  f"{group})\n")
        log.flush()
        for member in unit[1:]:
          with open(os.path.join(member["workdir"], runs.LOG_FILE), "a") as f:
            f.write(f"\n# {runs.now_iso()} trained in a lockstep group led by {row['run']}: its output is in "
                    f"{os.path.join(row['workdir'], runs.LOG_FILE)}\n")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
        active[slot] = (proc, unit, log)
      for slot, (proc, unit, log) in list(active.items()):
        if proc.poll() is not None:
          log.close()
          row = unit[0]
          for member in unit:
            member["returncode"] = proc.returncode
          del active[slot]
          solo = None if slot == solo else solo
          if (packed and proc.returncode != 0 and row["run"] not in retried_alone and stop["signum"] is None
              and _ran_out_of_memory(os.path.join(row["workdir"], runs.LOG_FILE), log_start[row["run"]])):
            retried_alone.add(row["run"])
            alone.append(unit)
            print(f"[launch] {row['run']}{f' (a group of {len(unit)})' if len(unit) > 1 else ''}: out of GPU memory "
                  f"beside {runs_per_device - 1} packed run(s); retrying it once with the GPUs to itself", flush=True)
      if stop["signum"] is not None:
        _terminate([proc for proc, _, _ in active.values()])
      display.update()
      time.sleep(poll_s)
  finally:
    _terminate([proc for proc, _, _ in active.values()])
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    display.update()
    display.close()
  if stop["signum"] == TIME_LIMIT:
    return TIME_LIMIT_EXIT
  return 130 if stop["signum"] is not None else 0


def _undecided(unit: list[dict], decided) -> list[dict]:
  """The members of ``unit`` whose cell still needs them (all, without ``decided``); the others are said."""
  if decided is None:
    return unit
  kept = []
  for row in unit:
    why = decided(row["run"])
    if why is None:
      kept.append(row)
    else:
      print(f"[launch] {row['run']}: skip ({why})", flush=True)
  return kept


def lr_groups(todo: list[dict], configs: dict[str, object], size: int) -> list[list[dict]]:
  """``todo`` partitioned into units of at most ``size`` rows that differ only in ``train.lr`` and
  resume from the same step (``configs``: run → resolved config); in the order of each unit's first row.
  Runs held by a live process, runs that failed before and text-data runs stay alone."""
  from hybrids.train import group_key

  units: list[list[dict]] = []
  open_unit: dict[tuple, list[dict]] = {}
  for row in todo:
    config = configs[row["run"]]
    # Alone: a run held by a live process (it resumes from wherever that one stops), one that failed
    # before (a fault of its own must not fail its group mates again), and text data (train_group's refusal).
    if row.get("status") == "running" or row.get("failures", 0) or config.data.name == "text":
      units.append([row])
      continue
    key = (group_key(config), row.get("resume_step", 0))
    unit = open_unit.get(key)
    if unit is None or len(unit) >= size:
      unit = open_unit[key] = []
      units.append(unit)
    unit.append(row)
  return units


# What a failed allocation raises (XLA's status code; the CUDA driver's error). Not "out of memory" alone:
# XLA's allocator also logs "ran out of memory ... this is not a failure" while autotuning.
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "CUDA_ERROR_OUT_OF_MEMORY")


def _ran_out_of_memory(log_path: str, start: int) -> bool:
  """Whether the attempt whose output starts at byte ``start`` of ``log_path`` failed for memory."""
  try:
    with open(log_path, "rb") as f:
      f.seek(start)
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return False
  return any(marker in text for marker in OUT_OF_MEMORY)


def _placement(group: list[str] | None) -> str:
  return f"devices {','.join(group)}" if group else "devices all"


def _mem_fraction(env: dict[str, str]) -> str:
  """What the child's JAX allocator may take: the variable's value, or JAX's default."""
  if "XLA_PYTHON_CLIENT_MEM_FRACTION" in env:
    prealloc = env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() not in ("false", "0")
    return env["XLA_PYTHON_CLIENT_MEM_FRACTION"] + (" preallocated" if prealloc else " on demand")
  return "default"


def _terminate(procs: list[subprocess.Popen]) -> None:
  """SIGTERM each child once (it checkpoints and exits), SIGKILL any still alive after the grace."""
  for proc in procs:
    if proc.poll() is None and not getattr(proc, "_launch_terminated", False):
      proc._launch_terminated = True
      proc.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + TERMINATE_GRACE_S
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
