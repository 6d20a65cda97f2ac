"""Lockstep groups (``hybrids.train.train_group``): runs that differ only in their learning rate,
trained together in one process, each exactly the run it would be alone but for the rounding of the
learning rate's product."""

import json
import os

import numpy as np
import pytest

from hybrids.config import ConfigError, get_config
from hybrids.train import RunDirectoryError, train, train_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"
LRS = (3e-3, 1e-2)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _same_run(group_dir, alone_dir):
  """A member's files against the same run trained alone: the same steps, evals and config; losses,
  gradient norms and evals equal up to the learning rate's rounding."""
  (steps_g, evals_g), (steps_a, evals_a) = _rows(group_dir), _rows(alone_dir)
  assert [r["step"] for r in steps_g] == [r["step"] for r in steps_a]
  assert [r["step"] for r in evals_g] == [r["step"] for r in evals_a] and evals_a
  for key in ("loss", "grad_norm", "lr", "accuracy"):
    np.testing.assert_allclose([r[key] for r in steps_g], [r[key] for r in steps_a], rtol=2e-5, atol=1e-7, err_msg=key)
  for key in ("eval_loss", "eval_accuracy"):
    np.testing.assert_allclose([r[key] for r in evals_g], [r[key] for r in evals_a], rtol=2e-5, atol=1e-7, err_msg=key)
  g, a = _summary(group_dir), _summary(alone_dir)
  assert (g["status"], g["step"], g["tokens"], g.get("early_stop")) == (a["status"], a["step"], a["tokens"], a.get("early_stop"))
  assert open(os.path.join(group_dir, "config.json")).read() == open(os.path.join(alone_dir, "config.json")).read()
  last = lambda d: max(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit())
  assert last(group_dir) == last(alone_dir) == a["step"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
  """Each learning rate of the group trained alone, uninterrupted."""
  dirs = []
  for lr in LRS:
    workdir = str(tmp_path_factory.mktemp(f"alone-{lr}"))
    train(get_config(TINY, {"train.lr": lr}), workdir, progress=False)
    dirs.append(workdir)
  return dirs


def test_each_member_of_a_group_is_the_run_it_would_be_alone(alone, tmp_path):
  dirs = [str(tmp_path / f"m{i}") for i in range(len(LRS))]
  summaries = train_group([get_config(TINY, {"train.lr": lr}) for lr in LRS], dirs, progress=False)
  assert [s["status"] for s in summaries] == ["done"] * len(LRS)
  for group_dir, alone_dir in zip(dirs, alone):
    _same_run(group_dir, alone_dir)
  # The learning rates differ, and so do the runs: the group did not train one model twice.
  assert _rows(dirs[0])[0][-1]["loss"] != _rows(dirs[1])[0][-1]["loss"]
  # Done members are left alone by a second launch.
  again = train_group([get_config(TINY, {"train.lr": lr}) for lr in LRS], dirs, progress=False)
  assert [s["step"] for s in again] == [s["step"] for s in summaries]


def test_an_interrupted_group_resumes_alone_or_together(alone, tmp_path):
  dirs = [str(tmp_path / f"m{i}") for i in range(len(LRS))]
  configs = [get_config(TINY, {"train.lr": lr}) for lr in LRS]
  first = train_group(configs, dirs, stop_after_steps=5, progress=False)
  assert [(s["status"], s["step"]) for s in first] == [("interrupted", 5)] * len(LRS)
  train(configs[0], dirs[0], progress=False)  # a member's checkpoint resumes alone...
  train_group(configs[1:], dirs[1:], progress=False)  # ...or in a group (here of one)
  for group_dir, alone_dir in zip(dirs, alone):
    _same_run(group_dir, alone_dir)
  # a group of members that resume from different steps is refused, naming them, and writes nothing
  more = [str(tmp_path / f"n{i}") for i in range(len(LRS))]
  train(configs[0], more[0], stop_after_steps=3, progress=False)
  train(configs[1], more[1], stop_after_steps=5, progress=False)
  files = lambda: [open(os.path.join(d, f), "rb").read() for d in more for f in ("summary.json", "metrics.jsonl")]
  before = files()
  with pytest.raises(RunDirectoryError, match="resume from different steps"):
    train_group(configs, more, progress=False)
  assert files() == before


def test_a_diverged_member_stops_alone_and_the_others_go_on(alone, tmp_path):
  dirs = [str(tmp_path / "good"), str(tmp_path / "bad")]
  summaries = train_group([get_config(TINY, {"train.lr": LRS[0]}), get_config(TINY, {"train.lr": 1e30})], dirs,
                          progress=False)
  assert summaries[1]["status"] == "diverged" and "non-finite" in summaries[1]["error"]
  assert summaries[0]["status"] == "done"
  _same_run(dirs[0], alone[0])


def test_an_early_stopped_member_is_frozen_at_its_stop(tmp_path):
  """MQAR with ``train.stop_at_accuracy``: the member that reaches it first stops there (its summary,
  checkpoint and metrics end at that eval, as alone), the other trains on."""
  spec = os.path.join(REPO, "experiments", "zoology_mqar.py") + ":tiny"
  over = lambda lr: get_config(spec, {"train.lr": lr, "train.steps": 40, "train.eval_every": 4,
                                      "train.checkpoint_every": 8, "train.stop_at_accuracy": 0.05})
  lrs = (1e-2, 1e-5)
  dirs = [str(tmp_path / f"g{i}") for i in range(2)]
  alone = [str(tmp_path / f"a{i}") for i in range(2)]
  train_group([over(lr) for lr in lrs], dirs, progress=False)
  for lr, workdir in zip(lrs, alone):
    train(over(lr), workdir, progress=False)
  stops = [_summary(d).get("early_stop") for d in alone]
  assert stops[0] is not None and stops[1] is None, stops  # the setting this test needs
  for group_dir, alone_dir in zip(dirs, alone):
    _same_run(group_dir, alone_dir)
  names = [os.path.basename(d) for d in dirs]
  assert [_summary(d)["lockstep_group"] for d in dirs] == [names, names]
  # the member that stopped was closed then: its wall time ends before the group's
  assert _summary(dirs[0])["wall_seconds"] < _summary(dirs[1])["wall_seconds"]


def test_a_group_is_refused_before_anything_is_written(tmp_path):
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  text = lambda lr: get_config(TINY, {"train.lr": lr, "data.name": "text", "data.files": __file__,
                                      "data.tokenizer": "bytes"})
  with pytest.raises(ConfigError, match="data.name='text'"):
    train_group([text(1e-3), text(1e-2)], dirs, progress=False)
  with pytest.raises(ConfigError, match="more than train.lr"):
    train_group([get_config(TINY), get_config(TINY, {"model.window": 4})], dirs, progress=False)
  with pytest.raises(ValueError, match="named twice"):
    train_group([get_config(TINY), get_config(TINY, {"train.lr": 1e-2})], [dirs[0], dirs[0]], progress=False)
  assert not any(os.path.exists(d) for d in dirs)


def test_a_sweep_trains_a_cells_learning_rates_as_one_group(tmp_path, monkeypatch, capsys):
  """``launch sweep --lr-group 2``: the two learning rates of the launcher's test sweep run in one
  process, each run directory as a sweep of single runs leaves it (within the lr's rounding); the
  dry run prints the one command; bad values are one line before anything is written."""
  from launch import runs
  from launch.__main__ import main
  from tests.test_launch import two_point_sweep

  exp, expanded = two_point_sweep(tmp_path, monkeypatch, steps=12)
  roots = {g: tmp_path / f"group-{g}" for g in (1, 2)}
  assert main(["sweep", exp, "--root", str(roots[2]), "--lr-group", "2", "--dry-run"]) == 0
  commands = [line for line in capsys.readouterr().out.splitlines() if "launch.run_point" in line]
  assert len(commands) == 1 and commands[0].count("--point-json") == 2, commands
  for g, root in roots.items():
    assert main(["sweep", exp, "--root", str(root), "--lr-group", str(g), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("2 run(s) in 1 lockstep group(s), 1 at a time" in out) == (g == 2), out
  lead, other = (str(roots[2] / rid) for rid, _, _ in expanded)
  assert "trained in a lockstep group led by" in open(os.path.join(other, runs.LOG_FILE)).read()
  assert "a lockstep group of 2" in open(os.path.join(lead, runs.LOG_FILE)).read()
  for rid, _, _ in expanded:
    alone, grouped = str(roots[1] / rid), str(roots[2] / rid)
    assert [a["status"] for a in runs.read_attempts(grouped)] == ["done"]
    assert runs.read_attempts(grouped)[0]["group"] == 2
    _same_run(grouped, alone)
  for bad, says in ((["--lr-group", "0"], "--lr-group=0 must be ≥ 1"),
                    (["--lr-group", "2", "--backend", "slurm"], "applies to --backend local")):
    assert main(["sweep", exp, "--root", str(tmp_path / "bad"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
  assert not (tmp_path / "bad").exists()


def test_a_group_process_records_each_member_as_it_ended(tmp_path, capsys):
  """``launch.run_point`` with several points: a diverged member is recorded "diverged" (exit 3), also
  when it is the only member left to train; a done member is left alone; a member that diverged
  earlier is not trained again."""
  from launch import run_point, runs
  from launch import sweep as sweep_lib
  from tests.test_launch import write_experiment

  exp = write_experiment(tmp_path, steps=6)
  (rid_a, point_a, _), (rid_b, point_b, _) = sweep_lib.expand(exp)
  bad = dict(point_b, **{"train.lr": 1e30, "train.grad_clip": 1e30})
  good = dict(point_a, **{"train.grad_clip": 1e30})
  ids = [sweep_lib.run_id(exp, sweep_lib.resolve_point(exp, p)) for p in (good, bad)]
  dirs = [str(tmp_path / "root" / rid) for rid in ids]
  code, summaries = run_point.execute_group(exp, [good, bad], dirs)
  assert code == run_point.EXIT_DIVERGED and [s["status"] for s in summaries] == ["done", "diverged"]
  assert [a["status"] for a in runs.read_attempts(dirs[0])] == ["done"]
  assert [a["status"] for a in runs.read_attempts(dirs[1])] == ["diverged"]
  again, _ = run_point.execute_group(exp, [good, bad], dirs)  # nothing to train: done stays done, diverged stays
  assert again == run_point.EXIT_DIVERGED and len(runs.read_attempts(dirs[1])) == 1
  # one member left to train, and it diverges: recorded as diverged, not as a crash
  lone = str(tmp_path / "root2" / ids[1])
  code, summaries = run_point.execute_group(exp, [good, bad], [dirs[0], lone])
  assert code == run_point.EXIT_DIVERGED and summaries[1]["status"] == "diverged"
  assert [a["status"] for a in runs.read_attempts(lone)] == ["diverged"]


MQAR_TINY = os.path.join(REPO, "experiments", "zoology_mqar.py") + ":tiny"
# One member (lr 1e-2) passes the stop accuracy at an early eval, the other (1e-5) never does.
MQAR_STOP = {"train.steps": 40, "train.eval_every": 4, "train.checkpoint_every": 8, "train.stop_at_accuracy": 0.05}
CELL_LRS = (1e-2, 1e-5)


def test_a_decided_cell_stops_its_whole_group(tmp_path):
  """``train_group(cell_stop=True)``: when one member passes ``train.stop_at_accuracy`` the others stop
  at the same eval, on a checkpoint, "done", their ``early_stop`` naming the member that decided; up
  to there each is its lone run. Without ``train.stop_at_accuracy`` it is refused before any write."""
  over = lambda lr, **kw: get_config(MQAR_TINY, {**MQAR_STOP, "train.lr": lr, **kw})
  dirs = [str(tmp_path / f"g{i}") for i in range(2)]
  alone = [str(tmp_path / f"a{i}") for i in range(2)]
  for lr, workdir in zip(CELL_LRS, alone):
    train(over(lr), workdir, progress=False)
  decided_at = (_summary(alone[0]).get("early_stop") or {}).get("step")
  assert decided_at and _summary(alone[1]).get("early_stop") is None  # the setting this test needs
  summaries = train_group([over(lr) for lr in CELL_LRS], dirs, progress=False, cell_stop=True)
  _same_run(dirs[0], alone[0])
  stopped = summaries[1]
  assert (stopped["status"], stopped["step"]) == ("done", decided_at)
  assert stopped["early_stop"]["cell_decided_by"] == "g0" and "cell decided: g0" in stopped["early_stop"]["reason"]
  (steps_g, evals_g), (steps_a, evals_a) = _rows(dirs[1]), _rows(alone[1])
  assert [r["step"] for r in steps_g] == [r["step"] for r in steps_a if r["step"] <= decided_at]
  np.testing.assert_allclose([r["loss"] for r in steps_g], [r["loss"] for r in steps_a[:len(steps_g)]], rtol=2e-5)
  np.testing.assert_allclose([r["eval_accuracy"] for r in evals_g],
                             [r["eval_accuracy"] for r in evals_a if r["step"] <= decided_at], rtol=2e-5, atol=1e-7)
  assert max(int(s) for s in os.listdir(os.path.join(dirs[1], "checkpoints")) if s.isdigit()) == decided_at
  # done is done: neither a second group nor the run alone trains it further
  train(over(CELL_LRS[1]), dirs[1], progress=False)
  assert _summary(dirs[1])["step"] == decided_at and len(_rows(dirs[1])[0]) == len(steps_g)
  with pytest.raises(ConfigError, match="stop_at_accuracy > 0"):
    train_group([over(lr, **{"train.stop_at_accuracy": 0.0}) for lr in CELL_LRS], [str(tmp_path / "x"),
                str(tmp_path / "y")], progress=False, cell_stop=True)
  assert not (tmp_path / "x").exists()


CELL_EXPERIMENT = '''
"""One MQAR cell at two learning rates that stop at an accuracy (launch sweep --cell-stop tests)."""
from hybrids.config import get_config as _get_config

def get_config(arg=None):
  return _get_config({spec!r}, {over!r})

def get_sweep(h, arg=None):
  return h.product([h.sweep("train.lr", {lrs!r})])
'''


def test_a_sweep_stops_a_cell_once_it_is_decided(tmp_path, monkeypatch, capsys):
  """``launch sweep --cell-stop``: with ``--lr-group`` the cell's group stops with its first run past the
  stop accuracy; without, a decided cell's other runs are not launched (nothing is written into them)
  and the sweep still exits 0; the report calls the cell decided, not incomplete. An experiment that
  never stops at an accuracy is refused in one line."""
  from launch import local, report, status
  from launch.__main__ import main
  from tests.test_launch import two_point_sweep

  monkeypatch.chdir(REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", REPO)
  exp = tmp_path / "cell.py"
  exp.write_text(CELL_EXPERIMENT.format(spec=MQAR_TINY, over=MQAR_STOP, lrs=list(CELL_LRS)))
  exp = str(exp)
  grouped = tmp_path / "grouped"
  assert main(["sweep", exp, "--root", str(grouped), "--lr-group", "2", "--cell-stop", "--dry-run"]) == 0
  (command,) = [line for line in capsys.readouterr().out.splitlines() if "launch.run_point" in line]
  assert command.endswith("--cell-stop"), command  # the printed command is the one that runs
  assert main(["sweep", exp, "--root", str(grouped), "--lr-group", "2", "--cell-stop", "--no-progress"]) == 0
  capsys.readouterr()
  by_lr = {json.load(open(d / "config.json"))["train"]["lr"]: _summary(d) for d in grouped.iterdir()
           if (d / "config.json").exists()}
  assert by_lr[CELL_LRS[1]]["early_stop"]["step"] == by_lr[CELL_LRS[0]]["early_stop"]["step"]
  assert by_lr[CELL_LRS[1]]["early_stop"]["cell_decided_by"] and by_lr[CELL_LRS[1]]["status"] == "done"

  apart = tmp_path / "apart"
  assert main(["sweep", exp, "--root", str(apart), "--filter", f"train.lr={CELL_LRS[0]}", "--no-progress"]) == 0
  capsys.readouterr()
  assert main(["sweep", exp, "--root", str(apart), "--cell-stop", "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert out.count("skip (cell decided by") == 1 and "pending (cell decided)" in out, out
  assert len([d for d in apart.iterdir() if d.is_dir() and (d / "config.json").exists()]) == 1
  assert sorted(r["status"] for r in status.collect(str(apart))) == ["done", "pending (cell decided)"]
  assert report.main([str(apart), "--out", str(tmp_path / "report")]) == 0
  data = json.load(open(tmp_path / "report" / "report.json"))
  (cell,) = data["cells"]
  assert cell["decided"] and cell["best_lr"] == CELL_LRS[0] and cell["missing"], cell
  md = open(tmp_path / "report" / "report.md").read()
  assert "Cells decided before every learning rate" in md and "Cells missing learning rates" not in md
  assert "(incomplete)" not in md

  # a cell that stops at no accuracy is never decided: its group gets no --cell-stop
  rows = [{"point": {"train.lr": lr}, "workdir": str(tmp_path / str(lr)), "cell_stop": stops}
          for lr, stops in ((1e-2, False), (1e-3, False))]
  assert "--cell-stop" not in local.unit_argv(exp, rows)
  assert "--cell-stop" in local.unit_argv(exp, [dict(r, cell_stop=True) for r in rows])
  plain, _ = two_point_sweep(tmp_path, monkeypatch, steps=4)
  assert main(["sweep", plain, "--root", str(tmp_path / "bad"), "--cell-stop"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--cell-stop: no point" in err and "stop_at_accuracy" in err, err
  assert not (tmp_path / "bad").exists()


def test_a_groups_vmapped_step_takes_the_pallas_kernels(lower_for_gpu):
  """A lockstep group vmaps the train step, so on a GPU its Pallas kernels run batched: the group step of
  a model with GLA, the diagonal scan and the delta rule on their Pallas paths lowers for CUDA from this
  host (each kernel a Triton call, none dropped to XLA), and a batched Pallas kernel (GLA with documents,
  interpreted) gives each member what its own call gives, gradients included."""
  import jax
  import jax.numpy as jnp

  from hybrids import config as config_lib
  from hybrids import sharding as sharding_lib
  from hybrids.train import build, group_steps
  from kernels.gla import gla

  impls = {f"model.{f}": "pallas" for f in ("scan_impl", "gla_impl", "delta_impl")}
  config = config_lib.resolve(get_config(TINY, {**impls, "model.pattern": ("gla", "rglru", "deltanet"), "model.n_layers": 3,
                                                "model.dtype": "bfloat16", "data.seq_len": 128, "data.vocab_size": 256,
                                                "model.vocab_size": 256, "train.batch_size": 2}))
  setup = build(config, sharding_lib.make_mesh(sharding_lib.mesh_config_of(config), batch_size=2))
  group_step, _ = group_steps(setup.trainer, config)
  members = 3
  stacked = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct((members,) + x.shape, x.dtype), tree)
  batch = {key: jax.ShapeDtypeStruct((2, 128), jnp.int32) for key in ("inputs", "labels")}
  module = lower_for_gpu(lambda p, o, b, lr, live: group_step(p, o, b, lr, live, None), stacked(setup.params),
                         stacked(setup.opt_state), batch, jax.ShapeDtypeStruct((members,), jnp.float32),
                         jax.ShapeDtypeStruct((members,), jnp.bool_))
  alone = lower_for_gpu(lambda p, o, b: setup.trainer.train_step(p, o, b), setup.params, setup.opt_state, batch)
  # every Triton kernel of the lone step (GLA's, the scan's, the delta rule's, forward and backward) is in
  # the group's, batched, and none fell back to XLA
  assert module.count("xla.gpu.triton") == alone.count("xla.gpu.triton") >= 8, module.count("xla.gpu.triton")

  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(keys[i], (members, 1, 64, 2, 16)) for i in range(3))
  log_decay = -jax.nn.softplus(jax.random.normal(keys[3], (members, 1, 64, 2, 16)))
  segments = jnp.asarray([[0] * 20 + [1] * 44])

  def loss(q, k, v, log_decay):
    o, state = gla(q, k, v, log_decay, segment_ids=segments, impl="pallas", interpret=True)
    return jnp.sum(o ** 2) + jnp.sum(state)

  batched = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_decay)
  for i in range(members):
    alone = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q[i], k[i], v[i], log_decay[i])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(alone)):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-5, atol=1e-5)
