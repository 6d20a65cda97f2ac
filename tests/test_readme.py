"""The README's two commands are the ones that work: CI runs the README's test command verbatim."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_gives_two_commands():
  quickstart, tests = readme_commands()
  assert "launch sweep experiments/quickstart.py" in quickstart
  assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
  _, tests = readme_commands()
  ci_lines = [l.strip() for l in open(os.path.join(REPO, ".ci", "run")) if l.strip() and not l.startswith("#")]
  assert tests.strip() in ci_lines


def test_quickstart_sweep_is_attention_swa_rglru():
  from launch.sweep import expand
  points = [p["config"] for _, p, _ in expand(os.path.join(REPO, "experiments", "quickstart.py"))]
  assert points == ["attention", "swa", "rglru"]
