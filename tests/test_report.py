"""``python -m launch report`` on fake run directories (JSON written directly; nothing trains).

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_report.py
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from launch import report

# Three mixers, each with a known law L(C) = E + A·C^(−α) in training FLOPs.
LAWS = {  # label in the report → (pattern, E, α); A puts 2 nats of reducible loss at C = 1e12
    "attention": (("attention",), 1.0, 0.25),
    "rglru+swa (griffin)": (("rglru", "rglru", "swa"), 1.1, 0.30),
    "mamba": (("mamba",), 1.2, 0.35),
}
WIDTHS = (64, 128, 256, 512)
VOCAB = 256


def _write(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _config(pattern, d_model, *, n_layers=3, window=16, seq_len=64, kv=4, size="", data="mqar") -> dict:
  return {"seed": 0,
          "model": {"pattern": list(pattern), "n_layers": n_layers, "d_model": d_model, "window": window, "size": size,
                    "parallel_merge": "sum", "moe_every": 0},
          "data": {"name": data, "seq_len": seq_len, "num_kv_pairs": kv, "vocab_size": VOCAB},
          "train": {"steps": 100, "batch_size": 8, "lr": 1e-3, "window_choices": []}}


def write_run(root, run_id, config, *, status="done", loss=None, accuracy=None, non_embedding=1e5,
              tokens=2e6, flops=True, state_bytes=None, error=None) -> None:
  params = non_embedding + VOCAB * config["model"]["d_model"]
  summary = {"status": status, "step": 100 if status == "done" else 37, "steps": 100, "params": params,
             "non_embedding_params": non_embedding, "tokens": tokens, "tokens_per_sec": 12345.0,
             "train_loss": None if loss is None else loss + 0.01}
  if flops:  # runs from before FLOP accounting lack these keys
    summary.update(flops_per_token_train=6 * non_embedding, train_flops=6 * non_embedding * tokens)
  if state_bytes is not None:
    summary["state_bytes_per_sequence"] = state_bytes
  if loss is not None and status == "done":
    summary["eval"] = {"step": 100, "eval_loss": loss, "eval_perplexity": float(np.exp(loss)),
                       "eval_accuracy": accuracy}
  if error:
    summary["error"] = error
  _write(os.path.join(root, run_id, "config.json"), config)
  _write(os.path.join(root, run_id, "summary.json"), summary)
  with open(os.path.join(root, run_id, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": 5.0, "accuracy": 0.0, "grad_norm": 1.0, "lr": 1e-3}) + "\n")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """3 mixers × 4 widths drawn from LAWS (1% of noise), one failed run, one point never started."""
  root = str(tmp_path_factory.mktemp("runs") / "fake_sweep")
  rng = np.random.default_rng(0)
  points = []
  for label, (pattern, e, alpha) in LAWS.items():
    for d in WIDTHS:
      run_id = f"fake-{pattern[0]}-{d}"
      non_embedding = 12.0 * 2 * d * d
      tokens = 20 * non_embedding
      old_style = label == "mamba"  # no FLOP keys: the report falls back to 6 · params · tokens
      params = non_embedding + VOCAB * d
      compute = 6 * (params if old_style else non_embedding) * tokens
      loss = (e + 2.0 * 1e12**alpha * compute**-alpha) * float(np.exp(rng.normal(0, 0.002)))
      accuracy = min(1.0, 0.2 + (0.8 if pattern == ("attention",) else 0.15) * np.log2(d / 32))
      write_run(root, run_id, _config(pattern, d), loss=loss, accuracy=accuracy, non_embedding=non_embedding,
                tokens=tokens, flops=not old_style, state_bytes=4.0 * d * (64 if pattern == ("attention",) else 16))
      points.append({"run_id": run_id, "point": {"model.pattern": list(pattern), "model.d_model": d}})
  write_run(root, "fake-failed", _config(("mamba",), 1024), status="failed", error="RuntimeError: out of memory")
  points.append({"run_id": "fake-failed", "point": {"model.pattern": ["mamba"], "model.d_model": 1024}})
  points.append({"run_id": "fake-pending", "point": {"model.pattern": ["rglru"], "model.d_model": 1024}})
  # Evaluation files of one run (hybrids/evaluate.py's schema): retrieval grids of two tasks,
  # per-position loss (null where nothing is scored) and held-out loss at two lengths.
  run = os.path.join(root, "fake-rglru-128")
  passkey = [[1, 1, 1], [0.5, 0.75, 1], [0, 0.25, 1]]
  _write(os.path.join(run, "eval", "retrieval.json"),
         {"task": "passkey", "lengths": [64, 128, 256], "depths": [0.0, 0.5, 1.0], "accuracy": passkey,
          "by_task": {"passkey": passkey, "niah": [[1, 1, 0.5], [1, 0.5, 0.5], [0.5, 0, 0]]}})
  sparse = [None] * 32 + list(np.linspace(3, 2, 32))
  _write(os.path.join(run, "eval", "position.json"),
         {"lengths": [64, 128], "loss_by_position": {"64": sparse, "128": list(np.linspace(4, 2.2, 128))},
          "window": 16, "train_seq_len": 64})
  _write(os.path.join(run, "eval", "loss.json"), {"lengths": [64, 256], "loss": [1.93, 2.25], "perplexity": [6.9, 9.5]})
  _write(os.path.join(root, "fake-attention-64", "eval", "mqar.json"),
         {"lengths": [64, 128], "num_kv_pairs": [4, 8], "accuracy": [1.0, 0.875], "loss": [0.01, 0.4]})
  os.makedirs(os.path.join(root, "fake-attention-128", "eval"))
  with open(os.path.join(root, "fake-attention-128", "eval", "loss.json"), "w") as f:
    f.write('{"lengths": [64')  # torn write: reported in Notes, the rest of the report unaffected
  _write(os.path.join(root, "sweep.json"), {"experiment": "experiments/fake.py", "points": points})
  assert report.main([root, "--bootstrap", "30"]) == 0
  with open(os.path.join(root, "report", "report.md")) as f:
    return root, f.read()


def _section(text: str, title: str) -> str:
  return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_run_table_lists_every_run_sorted(sweep):
  root, md = sweep
  runs = _section(md, "Runs")
  ids = re.findall(r"^\| `([^`]+)` \|", runs, flags=re.M)
  assert set(ids) == {f"fake-{p[0]}-{d}" for p, _, _ in LAWS.values() for d in WIDTHS} | {"fake-failed"}
  # Sorted by mixer label, then size.
  order = [(label, d) for label in sorted(LAWS) for d in WIDTHS]
  done_ids = [i for i in ids if i != "fake-failed"]
  assert done_ids == [f"fake-{LAWS[label][0][0]}-{d}" for label, d in order]
  row = next(l for l in runs.splitlines() if "`fake-attention-64`" in l)
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1:5] == ["done", "attention", "98.3k", "—"]  # window only for stacks with SWA
  griffin_row = next(l for l in runs.splitlines() if "`fake-rglru-64`" in l)
  assert "| rglru+swa (griffin) |" in griffin_row and "| 16 |" in griffin_row
  assert "12,345" in row
  # The old-style runs are marked as approximated and named.
  assert "6 · params · tokens" in runs and "`fake-mamba-64`" in runs.split("6 · params · tokens", 1)[1]


def test_failed_flop_accounting_and_unreadable_metrics_are_named_per_run(tmp_path):
  root = str(tmp_path / "runs")
  write_run(root, "no-flops", _config(("attention",), 64), loss=2.0, flops=False)
  path = os.path.join(root, "no-flops", "summary.json")
  with open(path) as f:
    summary = json.load(f)
  _write(path, {**summary, "flops_error": "NotImplementedError: mixer 'x' has no flops()"})
  write_run(root, "old-style", _config(("attention",), 64), loss=2.0, flops=False)  # no error: no note
  write_run(root, "metrics-dir", _config(("attention",), 64), status="running")
  metrics = os.path.join(root, "metrics-dir", "metrics.jsonl")
  os.remove(metrics)
  os.mkdir(metrics)  # open() raises IsADirectoryError, an OSError
  problems = []
  runs = {r.run_id: r for r in report.load_runs(root, problems)}
  assert runs["no-flops"].flops_source == runs["old-style"].flops_source == "6·params·tokens"
  assert problems == [
      f"`{metrics}` is unreadable (IsADirectoryError: [Errno 21] Is a directory: {metrics!r}); its losses are not used",
      "`no-flops`: FLOPs estimated as 6 · params · tokens because FLOP accounting failed in training "
      "(NotImplementedError: mixer 'x' has no flops())"]
  assert runs["metrics-dir"].loss is None


def test_fits_recover_each_mixers_exponent(sweep):
  _, md = sweep
  fits = _section(md, "Loss vs training FLOPs")
  for label, (_, e, alpha) in LAWS.items():
    row = next(l for l in fits.splitlines() if l.startswith(f"| {label} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    n, e_fit, alpha_fit = int(cells[1]), float(cells[2]), float(cells[4])
    lo, hi = (float(x) for x in re.findall(r"[-\d.]+", cells[5]))
    assert n == len(WIDTHS)
    # 0.2% noise on 4 points: α within 0.02 and E within 0.05 of the law (noise-free they are exact).
    assert abs(alpha_fit - alpha) < 0.02, (label, alpha_fit)
    assert abs(e_fit - e) < 0.05, (label, e_fit)
    assert lo <= alpha_fit <= hi


def test_missing_lists_failed_and_pending_points(sweep):
  _, md = sweep
  missing = _section(md, "Missing")
  assert "`fake-pending`" not in missing  # ids are plain in this table
  pending = next(l for l in missing.splitlines() if l.startswith("| fake-pending |"))
  assert "not started" in pending and "model.d_model=1024" in pending
  failed = next(l for l in missing.splitlines() if l.startswith("| fake-failed |"))
  assert "failed at step 37/100" in failed and "out of memory" in failed
  assert not any(l.startswith("| fake-attention") for l in missing.splitlines())


def test_plots_exist_and_are_embedded(sweep):
  root, md = sweep
  out = os.path.join(root, "report")
  for name in ("loss_vs_flops.png", "mqar_vs_width.png", "state_tradeoff.png", "retrieval_fake-rglru-128.png",
               "position_fake-rglru-128.png"):
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 1000, name
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"]({name})" in md
  evals = _section(md, "Evaluations")
  assert re.search(r"^\| `fake-rglru-128` \| rglru\+swa \(griffin\) \| 16 \| 1.9300 \| 2.2500 \|$", evals, flags=re.M)
  assert "| run | mixer | window | L=64 | L=256 |" in evals
  assert "MQAR at other lengths, attention (`fake-attention-64`)" in evals and "| 128 | 8 | 0.875 |" in evals
  assert "fake-attention-128/eval/loss.json` is unreadable" in _section(md, "Notes")
  # No sweep of sizes at one budget and no swept window: those plots are absent, not empty.
  assert not os.path.exists(os.path.join(out, "isoflop.png"))
  assert not os.path.exists(os.path.join(out, "window_ablation.png"))


def test_pareto_frontier():
  points = [(100, 0.2), (50, 0.3), (200, 0.25), (400, 0.9), (400, 0.5), (800, 0.9)]
  assert report.pareto_frontier(points) == [(50, 0.3), (400, 0.9)]


def test_isoflop_curves(tmp_path):
  """Several sizes at shared budgets → parabolas per budget, compute-optimal sizes growing with C."""
  root = str(tmp_path / "ladder")
  # L(N, D) = E + A/N^a + B/D^b (Chinchilla's form, smaller constants) at 2 budgets × 4 sizes; its
  # optimum N* ∝ C^(b/(a+b)) = C^0.45 lies inside the sizes at both budgets.
  for budget in (1e14, 1e15):
    for n in np.geomspace(3e5, 3e7, 4):
      tokens = budget / (6 * n)
      loss = 1.0 + 20 / n**0.34 + 20 / tokens**0.28
      write_run(root, f"iso-{budget:.0e}-{n:.0f}", _config(("rglru", "rglru", "swa"), 64, data="text"), loss=loss,
                non_embedding=n, tokens=tokens)
  assert report.main([root, "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
  md = (tmp_path / "out" / "report.md").read_text()
  assert (tmp_path / "out" / "isoflop.png").stat().st_size > 1000
  iso = _section(md, "IsoFLOP curves")
  optima = [float(m) for m in re.findall(r"\| (\d+(?:\.\d+)?)M \|", iso)]
  assert len(optima) == 2 and 0.3 < optima[0] < optima[1] < 30  # the optimal size grows with the budget
  exponent = float(re.search(r"N\* ∝ C\^([\d.]+) over 2 budgets", iso).group(1))
  assert abs(exponent - 0.45) < 0.1  # a parabola through 4 coarse sizes approximates the true vertex


def test_window_ablation_and_too_few_points(tmp_path):
  """Swept windows → loss vs window; too few budgets → no loss-vs-FLOPs plot or fit; no sweep.json."""
  root = str(tmp_path / "griffin")
  for seq_len in (64, 128):
    for window in (8, 16, 32):
      config = _config(("rglru", "rglru", "swa"), 64, window=window, seq_len=seq_len, size="1m", data="text")
      write_run(root, f"win-{seq_len}-{window}", config, loss=2.0 - window / 100 - seq_len / 1000)
  for tokens in (2e6, 2e7):
    write_run(root, f"attn-{tokens:.0e}", _config(("attention",), 64, size="1m", data="text"), loss=1.95, tokens=tokens)
  assert report.main([root, "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
  md = (tmp_path / "out" / "report.md").read_text()
  assert (tmp_path / "out" / "window_ablation.png").stat().st_size > 1000
  assert "](window_ablation.png)" in md and not (tmp_path / "out" / "isoflop.png").exists()
  ablation = _section(md, "Window ablation")
  assert "against the window" in ablation
  assert "| rglru+swa (griffin) w=8 | 1.8560 (lr 1e-3) | 1.7920 (lr 1e-3) |" in ablation
  assert "| attention (global) | 1.9500 (lr 1e-3) | — |" in ablation
  # attention has 2 budgets, each griffin series 1: nothing to fit, so no plot and no section claiming fits.
  assert not (tmp_path / "out" / "loss_vs_flops.png").exists() and "](loss_vs_flops.png)" not in md
  assert _section(md, "Loss vs training FLOPs").strip().startswith("Not drawn, and no scaling fit: no series")
  fits = {f["series"]: f for f in json.loads((tmp_path / "out" / "report.json").read_text())["fits"]}
  assert fits["attention"]["note"].startswith("2 budget(s): no fit") and fits["attention"]["alpha"] is None
  # Series split by the fields that vary within a label: window and seq_len for the griffin runs.
  assert "rglru+swa (griffin) w=8 T=64" in fits
  assert "No readable `sweep.json`" in _section(md, "Missing")


def test_near_constant_flops_draws_the_length_ablation_not_loss_vs_flops(tmp_path):
  """griffin_window:gpu's shape: Griffin-1024 and global attention at 3 lengths, one budget → loss vs length."""
  root = str(tmp_path / "gw")
  for seq_len, (griffin, attention) in {2048: (1.07, 1.23), 4096: (1.11, 1.35), 8192: (1.18, 1.41)}.items():
    for pattern, loss in ((("rglru", "rglru", "swa"), griffin), (("attention",), attention)):
      config = _config(pattern, 256, window=1024, seq_len=seq_len, size="5m", data="text")
      # Tokens fixed: FLOPs within 1% of each other (≥ 3 points per series would not help: span < 3×).
      write_run(root, f"gw-{pattern[0]}-{seq_len}", config, loss=loss, non_embedding=4.5e6 * (1 + seq_len / 1e6),
                tokens=16.4e6)
  assert report.main([root, "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
  out = tmp_path / "out"
  md = (out / "report.md").read_text()
  assert not (out / "loss_vs_flops.png").exists() and "](loss_vs_flops.png)" not in md and "fits L" not in md
  assert "span 4.44e+14 to 4.46e+14 FLOPs, 1.01×" in _section(md, "Loss vs training FLOPs")
  assert md.index("## Window ablation") < md.index("## Runs")  # the headline comes first
  ablation = _section(md, "Window ablation")
  assert "against the training sequence length" in ablation and "](window_ablation.png)" in ablation
  assert "| mixer | T=2048 | T=4096 | T=8192 |" in ablation
  assert "| rglru+swa (griffin) w=1024 | 1.0700 (lr 1e-3) | 1.1100 (lr 1e-3) | 1.1800 (lr 1e-3) |" in ablation
  assert "| attention (global) | 1.2300 (lr 1e-3) | 1.3500 (lr 1e-3) | 1.4100 (lr 1e-3) |" in ablation
  data = json.loads((out / "report.json").read_text())
  assert data["figures"] == ["window_ablation.png"]
  assert not any(f["plotted"] for f in data["fits"])
  # Three budgets but a 1.01× span: the series is not fitted either.
  wide = report.SeriesFit("s", None, [(1e14, 2.0), (1.005e14, 1.9), (1.01e14, 1.8)])
  assert not wide.plottable and report.SeriesFit("s", None, [(1e14, 2.0), (1e15, 1.9), (1e16, 1.8)]).plottable


LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))


def test_learning_rate_cells_best_edge_and_missing(tmp_path):
  """Zoology's protocol: 4 lrs per cell, the best kept, edges flagged, missing lrs named."""
  root = str(tmp_path / "mqar")
  accuracy = {  # (mixer, d_model) → accuracy per lr of LRS; None: failed; "pending": in sweep.json, not started
      ("attention", 64): [0.5, 0.9, 0.7, 0.3],          # interior best (lr 4.6e-4)
      ("attention", 128): [0.2, 0.4, 0.6, 0.95],        # best at the largest lr → edge
      ("based", 64): [1.0, 1.0, 1.0, 1.0],              # all tied → the middle of the grid, no edge
      ("based", 128): [0.8, 0.6, "pending", None],      # best at the smallest lr → edge; two lrs missing
  }
  points = []
  for (mixer, d), accs in accuracy.items():
    for lr, acc in zip(LRS, accs):
      run_id = f"{mixer}-{d}-{lr:.1e}"
      points.append({"run_id": run_id, "point": {"model.pattern": [mixer], "model.d_model": d, "train.lr": lr}})
      if acc == "pending":
        continue
      config = _config((mixer,), d)
      config["train"]["lr"] = lr
      write_run(root, run_id, config, status="failed" if acc is None else "done", loss=1.0 - (acc or 0),
                accuracy=acc, state_bytes=100.0 * d * (2 if mixer == "attention" else 1))
  _write(os.path.join(root, "sweep.json"), {"points": points})
  assert report.main([root, "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
  out = tmp_path / "out"
  data = json.loads((out / "report.json").read_text())
  cells = {(c["label"], c["fields"]["model.d_model"]): c for c in data["cells"]}
  assert len(cells) == 4
  assert cells[("attention", 64)]["best_lr"] == LRS[1] and not cells[("attention", 64)]["edge"]
  assert cells[("attention", 128)]["best_lr"] == LRS[3] and cells[("attention", 128)]["edge"]
  assert cells[("attention", 128)]["best_metric"] == 0.95 and cells[("attention", 128)]["metric"] == "eval_accuracy"
  assert cells[("based", 64)]["tied_lrs"] == list(LRS) and cells[("based", 64)]["best_lr"] == LRS[1]
  assert not cells[("based", 64)]["edge"]
  based = cells[("based", 128)]
  assert based["best_lr"] == LRS[0] and based["edge"]
  assert based["missing"] == [{"lr": LRS[2], "reason": "not started"}, {"lr": LRS[3], "reason": "failed"}]
  assert [x["lr"] for x in based["lrs"]] == list(LRS)

  md = (out / "report.md").read_text()
  lrs = _section(md, "Learning rates")
  assert "| cell | metric | lr 1e-4 | lr 4.6e-4 | lr 2.2e-3 | lr 1e-2 | best lr | flag |" in lrs
  assert "| attention d_model=128 | accuracy | 0.200 | 0.400 | 0.600 | **0.950** | 1e-2 | edge |" in lrs
  row = next(l for l in lrs.splitlines() if l.startswith("| based d_model=128 |"))
  assert ("| **0.800** | 0.600 | not started | failed | 1e-4 | edge; missing 2.2e-3 (not started), 1e-2 (failed) |"
          in row)
  assert "edge of the grid (2 of 4 cells): attention d_model=128 (lr 1e-2), based d_model=128 (lr 1e-4)" in lrs
  assert "Cells missing learning rates (1)" in lrs
  # The MQAR table and plots use each cell's best run, with its lr.
  width = _section(md, "MQAR accuracy vs width")
  assert "| attention | 0.900 (lr 4.6e-4 of 4) | 0.950 (lr 1e-2 of 4) **edge** |" in width
  assert "| based | 1.000 (lr 4.6e-4 of 4) | 0.800 (lr 1e-4 of 4) **edge** (incomplete) |" in width
  assert (out / "mqar_vs_width.png").stat().st_size > 1000 and (out / "state_tradeoff.png").stat().st_size > 1000
  runs = _section(md, "Runs")
  assert re.search(r"^\| `attention-128-1\.0e-02` \| done \| attention \| [^|]+ \| — \| 1e-2 \(best\) \|", runs,
                   flags=re.M)


def test_based_tradeoff_runs_share_one_state_panel_and_stale_figures_go(tmp_path):
  """Based's Fig. 2: runs tested on one mixture (``data.eval_segments``) share one panel whatever length
  each trained at; the report draws accuracy vs state with a table by state size (knob named, frontier
  marked) and no width plot, and removes the width plot the earlier report in ``--out`` drew (only what
  that report's report.json lists)."""
  root, out = str(tmp_path / "bt"), tmp_path / "out"
  mixture = [[64, 4, 1000], [256, 64, 1000], [1024, 256, 1000]]
  points = {  # run → (pattern, d_model, seq_len, knob, state bytes, accuracy)
      "attn": (("baseconv", "attention"), 64, 1024, {}, 500_000.0, 0.99),
      "based8": (("baseconv", "based"), 64, 256, {"feature_dim": 8}, 20_000.0, 0.75),
      "based16": (("baseconv", "based"), 128, 256, {"feature_dim": 16}, 70_000.0, 0.86),
      "swa64": (("baseconv", "swa"), 128, 256, {"window": 64}, 60_000.0, 0.5),
      "swa16": (("baseconv", "swa"), 128, 256, {"window": 16}, 18_000.0, 0.15),
  }
  for run_id, (pattern, d, seq_len, knob, state, acc) in points.items():
    config = _config(pattern, d, seq_len=seq_len, kv=64)
    config["data"]["eval_segments"] = mixture
    config["model"].update(knob)
    write_run(root, run_id, config, loss=1.0 - acc, accuracy=acc, state_bytes=state)
  os.makedirs(out)
  (out / "mqar_vs_width.png").write_bytes(b"an earlier report's")
  (out / "report.json").write_text(json.dumps({"figures": ["mqar_vs_width.png"]}))  # the earlier report's list
  for mine in ("notes.png", "position_embeddings.png"):  # the user's, though one has a report-like name
    (out / mine).write_bytes(b"not the report's")
  assert report.main([root, "--bootstrap", "0", "--out", str(out)]) == 0
  md = (out / "report.md").read_text()
  assert not (out / "mqar_vs_width.png").exists() and "## MQAR accuracy vs width" not in md
  assert (out / "notes.png").exists() and (out / "position_embeddings.png").exists()
  assert (out / "state_tradeoff.png").stat().st_size > 1000
  assert json.loads((out / "report.json").read_text())["figures"] == ["state_tradeoff.png"]
  state = _section(md, "MQAR accuracy vs state size")
  assert "test: mixture of 3 segments, seq_len 64–1024, 4–256 kv pairs — each point's best learning rate" in state
  rows = [l for l in state.splitlines() if l.startswith("| baseconv")]
  assert [r.split(" | ")[1] for r in rows] == ["window=16", "d_model=64, feature_dim=8", "window=64",
                                               "d_model=128, feature_dim=16", "—"]
  assert [r.rstrip(" |").endswith("yes") for r in rows] == [True, True, False, True, True]


def test_report_json_holds_every_run_and_the_fits(sweep):
  root, md = sweep
  with open(os.path.join(root, "report", "report.json")) as f:
    data = json.load(f)
  run_dirs = {d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "config.json"))}
  assert {r["run_id"] for r in data["runs"]} == run_dirs and len(data["runs"]) == len(run_dirs)
  for r in data["runs"]:
    with open(os.path.join(root, r["run_id"], "config.json")) as f:
      assert r["config"] == json.load(f)
    with open(os.path.join(root, r["run_id"], "summary.json")) as f:
      assert r["summary"] == json.load(f)
  # The fits table of report.md and the fits of report.json agree.
  fits = {f["series"]: f for f in data["fits"]}
  table = _section(md, "Loss vs training FLOPs")
  for label in LAWS:
    row = next(l for l in table.splitlines() if l.startswith(f"| {label} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert f"{fits[label]['alpha']:.4f}" == cells[4] and f"{fits[label]['E']:.4g}" == cells[2]
    assert fits[label]["plotted"] and len(fits[label]["alpha_ci"]) == 2 and fits[label]["n"] == len(WIDTHS)
  assert {m["run_id"] for m in data["missing"]} == {"fake-failed", "fake-pending"}
  assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(os.path.join(root, "report")))
  # Each run is one nested record, so pandas.json_normalize(data["runs"]) gives one row per run with
  # columns such as config.model.d_model and summary.eval.eval_loss (pandas is not a dependency).
  done = [r for r in data["runs"] if r["summary"].get("status") == "done"]
  assert done and all(isinstance(r["config"]["model"]["d_model"], int) and "eval_loss" in r["summary"]["eval"]
                      for r in done)


def test_log_ticks_are_few_round_and_inside_the_range():
  for lo, hi in ((4.50e14, 4.53e14), (2.4e12, 4.2e13), (1e10, 1e20), (1.07, 1.41), (0.7, 1.8), (64, 8192)):
    ticks = report.log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 7 and ticks == sorted(ticks), (lo, hi, ticks)
    assert all(lo * 0.999 <= t <= hi * 1.001 for t in ticks), (lo, hi, ticks)
    assert all(len(report._tick_text(t)) <= 7 for t in ticks), ticks  # "2e13", "1.2", "4.51e14"


def test_empty_or_missing_root_is_a_clear_error(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "sweep.json").write_text(json.dumps({"points": [{"run_id": "x", "point": {}}]}))
  assert report.main([str(empty)]) == 2
  err = capsys.readouterr().err
  assert "no runs in" in err and "RUNID/config.json" in err and "lists 1 points" in err
  assert not (empty / "report").exists()  # nothing written
  assert report.main([str(tmp_path / "nope")]) == 2
  assert "is not a directory" in capsys.readouterr().err


# A miniature survey: pure and hybrid stacks with known laws; the Mamba hybrid is the yardstick.
SURVEY_LAWS = {  # pattern → (E, α): same A, so at every budget the order of E is the order of losses
    ("mamba", "mamba", "swa"): (1.20, 0.30),
    ("gla", "gla", "swa"): (1.05, 0.30),      # clearly better than the Mamba hybrid
    ("rglru", "rglru", "swa"): (1.35, 0.30),  # clearly worse
    ("mamba",): (1.40, 0.30),                 # pure Mamba: its hybrid is 0.2 nats better
    ("gla",): (1.15, 0.30),                   # pure GLA: its hybrid is 0.1 nats better
    ("attention",): (1.10, 0.28),             # a reference, ranked but never "a hybrid"
}


def test_survey_at_one_budget_shows_each_mixer_pure_and_hybridized(tmp_path):
  """The survey's pilot (one size, one lr, no fit possible): a table and a plot of each recurrent mixer
  pure and as (m, m, swa) per window, sorted by the hybrid at the smallest window, with the gap and the
  difference to the Mamba hybrid; the untuned lr is said; no window ablation (this view replaces it)."""
  root, out = str(tmp_path / "pilot"), tmp_path / "out"
  pure = {"mamba": 4.0, "gla": 3.9, "rglru": 4.2}
  gain = {64: 0.2, 512: 0.3}
  for m, loss in pure.items():
    for pattern, window, value in [((m,), 64, loss)] + [((m, m, "swa"), w, loss - g) for w, g in gain.items()]:
      write_run(root, f"p-{'-'.join(pattern)}-{window}", _config(pattern, 128, window=window, size="1m", data="shards"),
                loss=value, non_embedding=0.85e6, tokens=17e6)
  for pattern, window, value in ((("attention",), 64, 3.85), (("swa",), 64, 4.1)):
    write_run(root, f"p-{pattern[0]}-{window}", _config(pattern, 128, window=window, size="1m", data="shards"),
              loss=value, non_embedding=0.85e6, tokens=17e6)
  assert report.main([root, "--bootstrap", "0", "--out", str(out)]) == 0
  md = (out / "report.md").read_text()
  data = json.loads((out / "report.json").read_text())
  assert data["figures"] == ["survey_one_budget.png"] and "## Window ablation" not in md
  assert (out / "survey_one_budget.png").stat().st_size > 1000
  section = _section(md, "The survey at one budget")
  assert "**1m: one learning rate per cell (untuned)" in section
  rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith("| mixer")]
  assert [r.split(" | ")[0].strip("| ") for r in rows] == ["gla", "mamba", "rglru"]
  assert rows[0] == "| gla | 3.9000 | 3.7000 | +0.2000 | -0.1000 | 3.6000 | +0.3000 | -0.1000 |"
  assert rows[1] == "| mamba | 4.0000 | 3.8000 | +0.2000 | — | 3.7000 | +0.3000 | — |"
  assert "References: attention 3.8500, swa w=64 4.1000." in section
  one = {r["mixer"]: r for r in data["survey"]["one_budget"]}
  assert one["rglru"]["vs_mamba_w512"] == pytest.approx(0.2) and one["gla"]["gap_w64"] == pytest.approx(0.2)


def test_mqar_panels_run_in_order_of_length(tmp_path):
  """Panels (and their tables) by sequence length as numbers: 64, 128, 1024 — not as text."""
  root = str(tmp_path / "mqar")
  for seq_len in (1024, 64, 128):
    for d in (64, 128):
      write_run(root, f"a-{seq_len}-{d}", _config(("attention",), d, seq_len=seq_len), loss=0.5, accuracy=0.9,
                state_bytes=float(seq_len * d))
  assert report.main([root, "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 0
  md = (tmp_path / "out" / "report.md").read_text()
  at = [md.index(f"seq_len {n}, 4 kv pairs — accuracy") for n in (64, 128, 1024)]
  assert at == sorted(at)


def test_survey_ranks_hybrids_and_names_those_that_beat_the_mamba_hybrid(tmp_path):
  root = str(tmp_path / "survey")
  rng = np.random.default_rng(3)
  sizes = (1e6, 2.5e6, 5e6, 1.2e7)  # non-embedding params: 12× span, as the survey's ladder
  for pattern, (e, alpha) in SURVEY_LAWS.items():
    for n in sizes:
      compute = 6 * n * 20 * n
      for lr, penalty in ((1e-3, 0.0), (3e-3, 0.05)):  # the worse lr must not enter the fit
        config = _config(pattern, 64, size="", data="shards")
        config["train"]["lr"] = lr
        config["train"]["steps"] = int(n)  # sizes differ in steps: one cell per (pattern, size)
        loss = (e + 2.0 * 1e12**alpha * compute**-alpha) * float(np.exp(rng.normal(0, 0.002))) + penalty
        write_run(root, f"s-{'-'.join(pattern)}-{int(n)}-{lr:g}", config, loss=loss, non_embedding=n, tokens=20 * n)
  path = report.build_report(root, str(tmp_path / "out"), n_bootstrap=60)
  md = open(path).read()
  survey = json.load(open(os.path.join(str(tmp_path / "out"), "report.json")))["survey"]
  kinds = {r["series"]: r["kind"] for r in survey["ranking"]}
  assert sorted(kinds.values()) == ["hybrid"] * 3 + ["pure"] * 2 + ["reference"]
  # Ranked by the loss at 10× the largest budget, which the laws order by E.
  by_e = sorted(SURVEY_LAWS, key=lambda p: SURVEY_LAWS[p][0])
  assert [r["series"].split(" ")[0] for r in survey["ranking"]] == [
      "+".join(dict.fromkeys(p)) for p in by_e]
  largest = max(6 * 20 * n * n for n in sizes)
  assert survey["target_budget"] == pytest.approx(10 * largest, rel=0.01)
  assert survey["common_budget"] == pytest.approx(largest, rel=0.01)
  for r in survey["ranking"]:
    lo, hi = r["loss_target_ci"]
    assert lo <= r["loss_target"] <= hi and r["loss_common_ci"][1] - r["loss_common_ci"][0] < hi - lo
  verdicts = {v["series"].split(" ")[0]: v["verdict"] for v in survey["versus_mamba_hybrid"]}
  assert verdicts == {"gla+swa": "lower", "rglru+swa": "higher"}
  gla = next(v for v in survey["versus_mamba_hybrid"] if v["series"].startswith("gla+swa"))
  lo, hi = gla["difference_ci"]
  assert lo < -0.15 < hi and abs(gla["difference"] + 0.15) < 0.02  # E differs by 0.15; A and α are shared
  gaps = {g["mixer"]: g for g in survey["pure_minus_hybrid"]}
  assert set(gaps) == {"mamba", "gla"}
  for mixer, true_gap in (("mamba", 0.2), ("gla", 0.1)):
    lo, hi = gaps[mixer]["gap_common_ci"]
    assert lo < true_gap < hi and abs(gaps[mixer]["gap_common"] - true_gap) < 0.02
  assert "## The survey at one budget" not in md and "one_budget" not in survey  # fitted: the fits answer it
  statement = _section(md, "Hybrids against the Mamba hybrid")
  assert re.search(r"Beat the Mamba hybrid \(interval below 0\): gla\+swa[^.]*\. Worse than it \(interval above "
                   r"0\): rglru\+swa", statement)
  assert "## Ranking at 10× the largest budget" in md and "## Pure − hybrid gap per mixer" in md


def test_recall_and_tail_loss_by_size_for_each_patterns_best(tmp_path, monkeypatch):
  """Runs evaluated by ``launch evaluate``: one row per pattern, one column per size, at each cell's best
  learning rate (a losing lr's better recall does not count), recall the mean over tasks, lengths and
  depths, tail loss over the last eighth at the longest length; a plot, ``evals_by_size`` in report.json;
  per-run figures left out past MAX_RUN_EVAL_FIGURES runs."""
  root, out = str(tmp_path / "survey"), tmp_path / "out"
  recall = {("gla",): (0.25, 0.5), ("gla", "gla", "swa"): (0.5, 0.75)}
  for pattern, accuracies in recall.items():
    for (size, n), acc in zip((("1m", 0.85e6), ("5m", 5.1e6)), accuracies):
      for lr, loss in ((1e-3, 3.0), (3e-3, 3.5)):  # the lower loss (lr 1e-3) is the cell's best
        config = _config(pattern, 128, window=64, size=size, data="shards")
        config["train"]["lr"] = lr
        run = os.path.join(root, f"s-{'-'.join(pattern)}-{size}-{lr:g}")
        write_run(root, os.path.basename(run), config, loss=loss, non_embedding=n, tokens=20 * n)
        grid = [[acc, acc], [acc, acc]] if lr == 1e-3 else [[1.0, 1.0], [1.0, 1.0]]
        _write(os.path.join(run, "eval", "retrieval.json"),
               {"task": "passkey", "lengths": [1024, 2048], "depths": [0.0, 1.0], "accuracy": grid,
                "by_task": {"passkey": grid, "niah": grid}})
        curve = [None] * 8 + [4.0] * 48 + [2.0] * 8  # the last eighth of 64 positions: 2.0
        _write(os.path.join(run, "eval", "position.json"),
               {"lengths": [32, 64], "loss_by_position": {"32": [9.0] * 32, "64": curve}, "window": 64,
                "train_seq_len": 32})
        # the compact figures hybrids.evaluate merges into summary.json beside those files
        summary = json.loads(open(os.path.join(run, "summary.json")).read())
        summary["evals"] = {"retrieval": {"step": 100, "accuracy": float(np.mean(grid)),
                                          "by_task": {"passkey": float(np.mean(grid)), "niah": float(np.mean(grid))}},
                            "position": {"step": 100, "tail_loss": {"32": 9.0, "64": 2.0}, "window": 64}}
        _write(os.path.join(run, "summary.json"), summary)
  assert report.main([root, "--bootstrap", "0", "--out", str(out)]) == 0
  md = (out / "report.md").read_text()
  section = _section(md, "Recall and long-context loss by size")
  rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith("| mixer")]
  assert rows == ["| gla | — | 0.250 / 2.000 | 0.500 / 2.000 |", "| gla+swa | 64 | 0.500 / 2.000 | 0.750 / 2.000 |"], rows
  assert "![recall by size](recall_by_size.png)" in md and (out / "recall_by_size.png").stat().st_size > 1000
  data = json.loads((out / "report.json").read_text())
  assert len(data["evals_by_size"]) == 4 and all(r["tail_loss_length"] == 64 for r in data["evals_by_size"])
  assert {r["retrieval_accuracy"] for r in data["evals_by_size"]} == {0.25, 0.5, 0.75}
  assert "8 runs have retrieval or position evals" not in md and "retrieval_s-gla-1m-0.001.png" in data["figures"]
  monkeypatch.setattr(report, "MAX_RUN_EVAL_FIGURES", 4)
  assert report.main([root, "--bootstrap", "0", "--out", str(out)]) == 0
  md = (out / "report.md").read_text()
  assert "8 runs have retrieval or position evals: their per-run figures are left out (more than 4)" in md
  assert not any(f.startswith(("retrieval_", "position_")) for f in json.loads((out / "report.json").read_text())["figures"])


def test_compute_spent_divides_each_attempt_among_the_runs_that_shared_its_device(tmp_path):
  """Device hours = Σ attempts' wall time × devices ÷ (packed processes × lockstep group): two runs of a
  group of 2, packed 4 to an H100 for 2 h (2 × 2 h / 8 = 0.5 h), one run alone on an H200 for 30 min then
  resumed on an H100 for 1 h; a killed attempt (no end) and a run whose attempts were not kept are
  counted, not timed."""
  root = str(tmp_path / "sweep")
  h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
  stamp = lambda hours: f"2026-12-08T{hours:02d}:00:00+00:00"
  half = lambda hours: f"2026-12-08T{hours:02d}:30:00+00:00"
  attempts = {
      "g1": [{"started": stamp(0), "ended": stamp(2), "runs_per_device": 4, "group": 2, "device_kind": h100}],
      "g2": [{"started": stamp(0), "ended": stamp(2), "runs_per_device": 4, "group": 2, "device_kind": h100},
             {"started": stamp(3), "ended": None}],  # killed: no end
      "solo": [{"started": stamp(0), "ended": half(0), "device_kind": h200, "device_count": 1},
               {"started": stamp(1), "ended": stamp(2), "runs_per_device": 1, "device_kind": h100}],
  }
  for i, rid in enumerate(("g1", "g2", "solo", "old")):
    write_run(root, rid, _config(("swa",), 32 * (i + 1)), loss=1.0, accuracy=0.5,
              status="interrupted" if rid == "g2" else "done")
    if rid in attempts:
      _write(os.path.join(root, rid, "launch.json"), {"attempts": attempts[rid]})
  path = report.build_report(root, str(tmp_path / "out"), n_bootstrap=0)
  compute = json.load(open(os.path.join(tmp_path, "out", "report.json")))["compute"]
  rows = {r["device"]: r for r in compute["by_device"]}
  assert rows[h100]["device_hours"] == pytest.approx(2 * 2 / 8 + 1.0)
  assert rows[h100]["attempts"] == 3 and rows[h100]["runs"] == 3 and rows[h100]["finished_runs"] == 2
  assert rows[h100]["finished_per_device_hour"] == pytest.approx(2 / 1.5)
  assert rows[h200]["device_hours"] == pytest.approx(0.5) and rows[h200]["finished_runs"] == 1
  assert compute["untimed_runs"] == 1 and compute["open_attempts"] == 1
  text = _section(open(path).read(), "Compute spent")
  assert f"| `{h100}` | 3 | 1.50 | 3 | 2 | 1.3 |" in text
  assert "1 run(s) have no attempt record" in text and "1 attempt(s) have no end" in text
