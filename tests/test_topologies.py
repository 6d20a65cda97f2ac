"""Named topologies: each resolves to a valid config, and the new layer mixes decode like their forward."""

import os

import jax
import pytest
from flax import nnx

from hybrids.config import get_config
from hybrids.model import HybridLM, layer_pattern
from hybrids.topologies import TOPOLOGIES, apply_topology
from hybrids.train import resolve
from test_model import assert_decodes_like_forward

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "quickstart.py")


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_every_topology_is_a_valid_quickstart_config(name):
  config = resolve(get_config(f"{QUICKSTART}:{name}"))
  assert tuple(config.model.pattern) == TOPOLOGIES[name]["model.pattern"]
  assert len(layer_pattern(config.model)) == max(2, len(config.model.pattern))


def test_topology_proportions_follow_their_papers():
  jamba = TOPOLOGIES["jamba"]["model.pattern"]
  assert jamba.count("attention") == 1 and jamba.count("mamba") == 7 and TOPOLOGIES["jamba"]["model.moe_every"] == 2
  based = TOPOLOGIES["based_hybrid"]["model.pattern"]
  assert [based.count(m) / len(based) for m in ("based", "swa", "baseconv")] == [0.2, 0.2, 0.6]


def test_unknown_topology_and_swax_windows_beyond_the_sequence():
  with pytest.raises(ValueError, match="unknown topology 'jamba2'; valid: based_hybrid, griffin, hawk, jamba"):
    apply_topology(get_config(f"{QUICKSTART}:tiny"), "jamba2")
  config = apply_topology(get_config(f"{QUICKSTART}:tiny", {"data.seq_len": 256}), "swax")
  assert tuple(config.train.window_choices) == (128,)


def test_based_hybrid_decodes_like_its_forward():
  """Jamba's MoE-every-other-layer stack is covered in test_model.py; here the Based mix of layers
  (first half of the pattern: BaseConv, Based, BaseConv, SWA, BaseConv)."""
  config = get_config(f"{QUICKSTART}:based_hybrid", {"model.d_model": 16, "model.num_heads": 2, "model.window": 4,
                                                      "model.n_layers": 5})
  config.model.vocab_size = 40
  model = HybridLM(config.model, rngs=nnx.Rngs(params=0))
  assert_decodes_like_forward(model, jax.random.randint(jax.random.key(1), (2, 9), 0, 40), prefix=5)
