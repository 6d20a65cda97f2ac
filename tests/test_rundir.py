"""The run-directory module (``hybrids.rundir``): file names spelled once, atomic JSON, the config a run
directory holds, its summary and its lock — and the trainer, evaluator and launcher going through it."""

import ast
import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from hybrids import rundir
from hybrids.config import get_config, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"


@pytest.fixture(scope="module")
def config():
  return resolve(get_config(TINY))


# ----------------------------------------------------------------------------- JSON files

def test_write_json_replaces_atomically_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "x.json")
  rundir.write_json(path, {"a": 1})
  rundir.write_json(path, {"b": (2, 3)})
  assert json.load(open(path)) == {"b": [2, 3]} and os.listdir(tmp_path) == ["x.json"]


def test_read_json_is_lenient_unless_strict(tmp_path):
  assert rundir.read_json(str(tmp_path / "missing.json")) == {}
  assert rundir.read_json(str(tmp_path / "missing.json"), strict=True) == {}
  (tmp_path / "cut.json").write_text('{"status": "runn')
  assert rundir.read_json(str(tmp_path / "cut.json")) == {}
  with pytest.raises(json.JSONDecodeError):
    rundir.read_json(str(tmp_path / "cut.json"), strict=True)
  (tmp_path / "list.json").write_text("[1, 2]")
  assert rundir.read_json(str(tmp_path / "list.json")) == {}  # not an object: nothing to .get from


# ----------------------------------------------------------------------------- config.json

def test_prepare_writes_the_identity_then_accepts_only_the_same_run(tmp_path, config):
  workdir = str(tmp_path / "run")
  rundir.prepare(config, workdir, write=False)
  assert not os.path.exists(os.path.join(workdir, rundir.CONFIG_FILE))  # a non-primary process only checks
  rundir.prepare(config, workdir)
  stored = json.load(open(os.path.join(workdir, rundir.CONFIG_FILE)))
  assert stored == rundir.config_json(config) and "runtime" not in stored
  assert rundir.holds_config(workdir, config) and rundir.config_differences(stored, config) == []
  rundir.prepare(config, workdir)  # the same run resumes

  other = config.copy_and_resolve_references()
  other.train.lr = config.train.lr * 2
  assert not rundir.holds_config(workdir, other)
  assert rundir.config_differences(stored, other) == [
      f"  train.lr: {config.train.lr!r} (on disk) != {other.train.lr!r} (requested)"]
  with pytest.raises(rundir.RunDirectoryError, match="holds a run with a different config(.|\n)*train.lr"):
    rundir.prepare(other, workdir)

  moved = config.copy_and_resolve_references()
  moved.runtime.mesh.fsdp = 4  # placement is not identity
  rundir.prepare(moved, workdir)
  rundir.write_json(os.path.join(workdir, rundir.CONFIG_FILE), {**stored, "runtime": {"mesh": {"data": 2}}})
  assert rundir.holds_config(workdir, config)  # an older config.json with its runtime section still matches


def test_prepare_refuses_an_unreadable_config_and_checkpoints_without_one(tmp_path, config):
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / rundir.CONFIG_FILE).write_text("{")
  with pytest.raises(rundir.RunDirectoryError, match="is not valid JSON .*refusing to overwrite it"):
    rundir.prepare(config, str(broken))
  assert (broken / rundir.CONFIG_FILE).read_text() == "{" and not rundir.holds_config(str(broken), config)
  orphan = tmp_path / "orphan"
  (orphan / rundir.CHECKPOINTS_DIR / "4").mkdir(parents=True)
  with pytest.raises(rundir.RunDirectoryError, match=f"has checkpoints but no {rundir.CONFIG_FILE}"):
    rundir.prepare(config, str(orphan))


def test_run_ids_hash_the_config_json_identity(config):
  from launch import sweep as sweep_lib
  import hashlib
  payload = json.dumps(rundir.config_json(config), sort_keys=True)
  assert sweep_lib.run_id("experiments/quickstart.py", config) == \
      "quickstart-" + hashlib.sha256(payload.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- summary.json

def test_summary_read_write_and_append(tmp_path):
  workdir = str(tmp_path)
  assert rundir.read_summary(workdir) == {}
  rundir.append_to_summary(workdir, "corrupt_checkpoints", [{"step": 4}])
  assert not os.path.exists(os.path.join(workdir, rundir.SUMMARY_FILE))  # only into an existing summary
  rundir.write_summary(workdir, {"status": "running", "step": 8})
  rundir.append_to_summary(workdir, "corrupt_checkpoints", [{"step": 4}])
  rundir.append_to_summary(workdir, "corrupt_checkpoints", [{"step": 8}])
  assert rundir.read_summary(workdir) == {"status": "running", "step": 8,
                                          "corrupt_checkpoints": [{"step": 4}, {"step": 8}]}
  (tmp_path / rundir.SUMMARY_FILE).write_text('{"status": ')
  with pytest.raises(rundir.RunDirectoryError, match=r"unreadable \(JSONDecodeError.*could not record "
                                                     r"corrupt_checkpoints: \[\{\"step\": 12\}\]"):
    rundir.append_to_summary(workdir, "corrupt_checkpoints", [{"step": 12}])
  assert (tmp_path / rundir.SUMMARY_FILE).read_text() == '{"status": '  # left as found
  assert rundir.read_summary(workdir) == {}
  with pytest.raises(json.JSONDecodeError):
    rundir.read_summary(workdir, strict=True)


# ----------------------------------------------------------------------------- the lock

def test_run_lock_is_reentrant_for_its_thread_and_refuses_others(tmp_path):
  workdir = str(tmp_path / "run")
  assert not rundir.is_locked(workdir) and rundir.lock_holder(workdir) == {}
  with rundir.run_lock(workdir):
    holder = rundir.lock_holder(workdir)
    assert holder["pid"] == os.getpid() and holder["argv"] == list(sys.argv)
    with rundir.run_lock(workdir):
      pass
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      with pytest.raises(rundir.RunBusy, match=f"being trained by another process: pid {os.getpid()} on "):
        pool.submit(lambda: rundir.run_lock(workdir).__enter__()).result()
  assert open(os.path.join(workdir, rundir.LOCK_FILE)).read() == ""  # a clean release leaves no holder
  assert rundir.describe_holder({}) == "an unknown process (its lock file names none)"


def test_a_lock_held_by_another_process_is_seen_and_refused(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from hybrids import rundir\nwith rundir.run_lock(sys.argv[1]):\n"
       "  print('held', flush=True); sys.stdin.read()", workdir],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert rundir.is_locked(workdir) and rundir.lock_holder(workdir)["pid"] == holder.pid
    with pytest.raises(rundir.RunBusy, match=f"pid {holder.pid} on "):
      with rundir.run_lock(workdir, wait_s=0.3):
        pass
  finally:
    holder.stdin.close()
    holder.wait(30)
  assert not rundir.is_locked(workdir)


# ----------------------------------------------------------------------------- one module owns them

def test_launch_and_train_use_the_same_names_and_lock():
  from hybrids import config as config_lib
  from hybrids import evaluate
  from hybrids import train
  from launch import runs

  assert runs.run_lock is rundir.run_lock and runs.RunBusy is rundir.RunBusy and runs.is_locked is rundir.is_locked
  assert runs.read_summary is rundir.read_summary and runs.LAUNCH_FILE == rundir.LAUNCH_FILE
  assert train.resolve is config_lib.resolve and train.prepare_workdir is rundir.prepare
  assert train.RunDirectoryError is rundir.RunDirectoryError and issubclass(train.RunBusyError, rundir.RunDirectoryError)
  assert (train.CONFIG_FILE, train.SUMMARY_FILE, train.CHECKSUM_FILE) == \
      (rundir.CONFIG_FILE, rundir.SUMMARY_FILE, rundir.CHECKSUM_FILE)
  assert evaluate.EVAL_DIR == rundir.EVAL_DIR


# (CORRUPT_DIR is left out: "corrupt_checkpoints" is also the summary key that lists them.)
FILE_NAMES = {rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.SUMMARY_FILE, rundir.CHECKPOINTS_DIR,
              rundir.CHECKSUM_FILE, rundir.CHECKSUMS_SINCE_FILE, rundir.LAUNCH_FILE, rundir.LOG_FILE,
              rundir.LOCK_FILE}


def _code_strings(path):
  """String constants of a module's code (docstrings left out)."""
  tree = ast.parse(open(path).read())
  docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
  return [(node.lineno, node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_trainer_evaluator_and_launcher_never_spell_a_run_file_name():
  paths = [os.path.join(REPO, "hybrids", name) for name in ("train.py", "evaluate.py")]
  paths += [os.path.join(REPO, "launch", name) for name in sorted(os.listdir(os.path.join(REPO, "launch")))
            if name.endswith(".py")]
  spelled = [f"{os.path.relpath(p, REPO)}:{line}: {value!r}" for p in paths for line, value in _code_strings(p)
             if value in FILE_NAMES]
  assert not spelled, "use hybrids.rundir's names:\n" + "\n".join(spelled)


def test_rundir_imports_neither_jax_nor_the_trainer_nor_the_launcher():
  tree = ast.parse(open(rundir.__file__).read())
  imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
  assert not {m for m in imported if m.split(".")[0] in ("launch", "jax") or m == "hybrids.train"}, imported
  out = subprocess.run([sys.executable, "-c", "import sys, hybrids.rundir, launch.runs; print('jax' in sys.modules)"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"  # launch status / report stay fast
