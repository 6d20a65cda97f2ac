"""``python -m hybrids.generate``: a run's checkpoint continues a prompt; bad requests are one line, exit 2."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from hybrids.config import get_config
from hybrids.generate import generate, main
from hybrids.model import HybridLM
from hybrids.train import train

from test_validation import TINY, _one_error_line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  corpus = root / "corpus.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
  short = {"train.steps": 3, "train.checkpoint_every": 3}
  train(get_config(TINY, short), str(root / "mqar"), progress=False)
  train(get_config(TINY, {**short, "data.name": "text", "data.files": str(corpus), "data.heldout_fraction": 0.2}),
        str(root / "text"), progress=False)
  return {"mqar": str(root / "mqar"), "text": str(root / "text"), "empty": str(root)}


def test_help_documents_the_flags(capsys):
  with pytest.raises(SystemExit) as exited:
    main(["--help"])
  assert exited.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--workdir", "--prompt", "--prompt-ids", "--max-new-tokens", "--temperature", "--top-k", "--seed"):
    assert flag in out


def test_text_prompt_is_continued_with_a_progress_bar(runs, capsys):
  assert main(["--workdir", runs["text"], "--prompt", "the quick", "--max-new-tokens", "80"]) == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("the quick") and len(captured.out) > len("the quick")
  assert "80/80" in captured.err  # the bar of a long output


def test_token_ids_match_the_library_and_sampling_is_seeded(runs, capsys):
  from hybrids import evaluate

  assert main(["--workdir", runs["mqar"], "--prompt-ids", "1,2,3", "--max-new-tokens", "70", "--no-progress"]) == 0
  ids = [int(i) for i in capsys.readouterr().out.strip().split(",")]
  config = evaluate.load_config(runs["mqar"])
  _, graphdef, abstract_state, params = evaluate.restore_params(runs["mqar"], config)
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, params)
  expected = generate(nnx.merge(graphdef, state), np.asarray([[1, 2, 3]]), 70)
  assert ids == np.asarray(expected)[0].tolist()
  argv = ["--workdir", runs["mqar"], "--prompt-ids", "1,2", "--max-new-tokens", "8", "--temperature", "1.0",
          "--top-k", "5", "--seed", "3", "--num-samples", "2"]
  assert main(argv) == 0
  first = capsys.readouterr().out
  assert main(argv) == 0
  assert capsys.readouterr().out == first and len(first.strip().splitlines()) == 2


BAD_REQUESTS = [
    ("mqar", ["--prompt-ids", "1,64"], "token id 64 is outside the run's vocabulary [0, 64)"),
    ("mqar", ["--prompt-ids", "1,-2"], "token id -2 is outside"),
    ("mqar", ["--prompt-ids", "1.5,2"], "'1.5' is not an integer token id"),
    ("mqar", ["--prompt-ids", "a"], "'a' is not an integer token id"),
    ("mqar", ["--prompt-ids", ","], "is empty"),
    ("mqar", ["--prompt-ids", "1", "--temperature", "nan"], "--temperature=nan must be a finite number"),
    ("mqar", ["--prompt-ids", "1", "--temperature", "-1"], "--temperature=-1.0"),
    ("mqar", ["--prompt-ids", "1", "--top-k", "65"], "--top-k=65 exceeds the run's vocabulary (64)"),
    ("mqar", ["--prompt-ids", "1", "--top-k", "-1"], "--top-k=-1"),
    ("mqar", ["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    ("mqar", ["--prompt-ids", "1", "--num-samples", "0"], "--num-samples=0"),
    ("mqar", ["--prompt-ids", "1", "--seed", "-1"], "--seed=-1"),
    ("mqar", ["--prompt", "hello"], "has no text tokenizer; give token ids in [0, 64) with --prompt-ids"),
    ("text", ["--prompt", ""], "--prompt is empty"),
    ("empty", ["--prompt-ids", "1"], "is not a run directory"),
    ("/nonexistent/run", ["--prompt-ids", "1"], "does not exist"),
]


@pytest.mark.parametrize("run,argv,message", BAD_REQUESTS, ids=[" ".join(a) for _, a, _ in BAD_REQUESTS])
def test_bad_request_is_one_line_exit_2(runs, capsys, run, argv, message):
  assert main(["--workdir", runs.get(run, run), *argv]) == 2
  captured = capsys.readouterr()
  assert message in _one_error_line(captured.err) and captured.out == ""


@pytest.mark.parametrize("prompt,kwargs,message", [
    (np.asarray([[1.0, 2.0]]), {}, "integer token ids"),
    (np.asarray([[1, 40]]), {}, "outside the vocabulary"),
    (np.asarray([[-1, 2]]), {}, "outside the vocabulary"),
    (np.zeros((1, 0), np.int32), {}, "prompt_len"),
    (np.asarray([[1, 2]]), {"temperature": math.nan}, "temperature=nan"),
    (np.asarray([[1, 2]]), {"top_k": 41}, "top_k=41"),
])
def test_library_generate_refuses_what_it_would_silently_clip(prompt, kwargs, message):
  from hybrids.config import model_config

  c = model_config()
  c.vocab_size, c.d_model, c.n_layers, c.num_heads, c.window, c.pattern = 40, 16, 1, 2, 3, ("rglru",)
  with pytest.raises(ValueError, match=message):
    generate(HybridLM(c, rngs=nnx.Rngs(params=0)), prompt, 2, **kwargs)


BAD_INPUT_KINDS = len(BAD_REQUESTS) + 6


def test_readme_counts_the_bad_inputs_tried():
  import os
  import re

  import test_validation

  readme = open(os.path.join(test_validation.REPO, "README.md")).read()
  quoted = int(re.search(r"The tests try (\d+) kinds of bad input", readme).group(1))
  assert quoted == test_validation.BAD_INPUT_KINDS + BAD_INPUT_KINDS >= 40
