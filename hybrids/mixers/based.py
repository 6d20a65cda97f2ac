"""Based: linear attention with a 2nd-order Taylor feature map, plus a short convolution.

Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff".

    x̃ = Conv1D_4(x)                                              short causal conv (local mixing)
    q_t = W_q x̃_t,  k_t = W_k x̃_t ∈ R^{d'} per head (d' = feature_dim = 16),  v_t = W_v x̃_t
    φ(x) = [1, x / d'^¼, vec(x xᵀ) / √(2d')]        ⇒ φ(q)·φ(k) = 1 + q·k/√d' + (q·k)²/(2d')
    o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)
    y_t = W_o o_t

The Taylor kernel is a 2nd-order approximation of exp(q·k/√d') and is always positive
(1 + a + a²/2 > 0), so the normaliser never vanishes. State ``[batch, heads, 1 + d' + d'², d_head + 1]``.

Two parallel forms of the same function (``model.based_form``; ``"auto"``, the default, takes for each
call the one that does fewer FLOPs at its length, by :meth:`Based.flops`: the quadratic form for short
rows, e.g. Zoology's T = 256 at d' = 8, where an H100 step took 5.67 ms against the chunked form's 9.13;
the chunked form from about T = 512 at d' = 8, T = 1024 at d' = 16):

- ``"chunk"``: ``kernels.gla`` without decay on the expanded features; the normaliser is a
  column of ones appended to ``v``. Linear in time; every token carries 1 + d' + d'² features.
- ``"quadratic"``: the kernel on ``s = q·k/√d'`` itself, ``A_ts = 1 + s + s²/2`` for ``s ≤ t`` in the
  same document, then ``A [v | 1]``: a causal time × time product with no feature expansion (the
  attention-like view of the Based paper, fla's ``parallel_based``). Quadratic in time; for short
  rows, where the expansion to 1 + d' + d'² features and the chunk states cost more than T² scores
  (it stores ``[batch, heads, time, time]`` f32 scores: 1 GiB at batch 256, one head, T = 1024).
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import CausalConv1D, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH, Setting
from kernels.documents import document_index
from kernels.gla import gla, gla_step

EPS = 1e-6
FORMS = ("auto", "chunk", "quadratic")


def taylor_feature_map(x):
  """``[..., d]`` → ``[..., 1 + d + d²]`` with ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``."""
  d = x.shape[-1]
  x = x.astype(jnp.float32)
  outer = rearrange(x[..., :, None] * x[..., None, :], "... i j -> ... (i j)")
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), jnp.float32), x / d ** 0.25, outer / (2 * d) ** 0.5], axis=-1)


class Based(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # projections and a short conv only
  SETTINGS = {
      "feature_dim": Setting(16, "Based's q/k width per head", 1),
      "chunk_size": CHUNK_SIZE,
      "conv_width": CONV_WIDTH,
      "based_form": Setting("auto", "Based's parallel form: chunk (kernels.gla on the expanded features, linear in "
                            "time), quadratic (the Taylor kernel of q·k as a causal time × time product) or auto "
                            "(per call, the one with fewer FLOPs at its length)"),
  }
  # Packed documents: the short conv reads no earlier document and the linear-attention state (with
  # its normaliser) restarts from 0 at each start; the feature map is per token.
  SEGMENTS = True

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.feature_dim = cfg.feature_dim
    self.head_dim = cfg.d_model // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    self.form = cfg.based_form
    self.conv = CausalConv1D(cfg.d_model, cfg.conv_width, dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype),
                             rngs=rngs)
    self.q_proj = linear(cfg, cfg.d_model, self.heads * self.feature_dim, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, self.heads * self.feature_dim, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, self.heads * self.head_dim, rngs=rngs)
    self.o_proj = linear(cfg, self.heads * self.head_dim, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    if cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model}")
    if cfg.feature_dim <= 0:
      raise ValueError(f"model.feature_dim={cfg.feature_dim} must be positive")
    from hybrids.checks import check_int
    check_int(cfg.feature_dim, "model.feature_dim", 1, note=" (Based's q/k width per head)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    if cfg.based_form not in FORMS:
      raise ValueError(f"model.based_form={cfg.based_form!r}; valid: {', '.join(FORMS)}")

  def _qkv(self, x, *, features: bool = True):
    """``q, k``: ``[..., heads, 1 + d' + d'²]`` features (``features=False``: the ``[..., heads, d']``
    projections, f32); ``v``: ``[..., heads, d_head + 1]`` with the normaliser's column of ones."""
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    q, k = split(self.q_proj(x)).astype(jnp.float32), split(self.k_proj(x)).astype(jnp.float32)
    if features:
      q, k = taylor_feature_map(q), taylor_feature_map(k)
    v = split(self.v_proj(x)).astype(jnp.float32)
    return q, k, jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)

  def _quadratic(self, q, k, v, segment_ids, return_state: bool):
    """The ``"quadratic"`` form: ``q, k [batch, time, heads, d']``, ``v [batch, time, heads, d_head + 1]``
    → ``(o [batch, time, heads, d_head + 1], final state or None)``; the state, only when asked for,
    is the last document's ``Σ φ(k_s) v_sᵀ``."""
    time = q.shape[1]
    # Products at JAX's default matmul precision, like the chunked XLA form's (TF32 on recent GPUs).
    s = jnp.einsum("bthf,bshf->bhts", q, k) / self.feature_dim ** 0.5
    visible = jnp.tril(jnp.ones((time, time), bool))[None, None]
    if segment_ids is not None:  # by document, not by id: an id that recurs later is a new document
      document = document_index(segment_ids)
      visible = visible & (document[:, None, :, None] == document[:, None, None, :])
    scores = jnp.where(visible, 1.0 + s + 0.5 * s * s, 0.0)
    o = jnp.einsum("bhts,bshd->bthd", scores, v)
    if not return_state:
      return o, None
    features = taylor_feature_map(k)
    if segment_ids is not None:
      features = features * (document == document[:, -1:])[..., None, None]
    return o, jnp.einsum("bshf,bshd->bhfd", features, v)

  def _out(self, o):
    o = o[..., :-1] / (o[..., -1:] + EPS)
    return self.o_proj(rearrange(o, "... h d -> ... (h d)").astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    x, conv_state = self.conv(x, return_state=True, segment_ids=segment_ids)
    if self.form_for(x.shape[1]) == "quadratic":
      o, state = self._quadratic(*self._qkv(x, features=False), segment_ids, return_state)
    else:
      q, k, v = self._qkv(x)
      o, state = gla(q, k, v, None, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(o)
    return (y, {"conv": conv_state, "S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    features = 1 + self.feature_dim + self.feature_dim ** 2
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, features, self.head_dim + 1), jnp.float32)}

  def step(self, x_t, state):
    x_t, conv_state = self.conv.step(x_t, state["conv"])
    q, k, v = self._qkv(x_t)
    o, s = gla_step(q, k, v, None, state["S"])
    return self._out(o), {"conv": conv_state, "S": s}

  def form_for(self, seq_len: int) -> str:
    """The parallel form a call of ``seq_len`` tokens runs: ``model.based_form``, or for ``"auto"`` the
    form with fewer FLOPs a token at that length by :meth:`flops`' count (ties: quadratic). FLOPs are the
    rule because the one H100 measurement agrees with them (T 256, d' 8: quadratic 19.2k FLOPs a token and
    5.67 ms a step, chunked 24.1k and 9.13 ms); where the two counts are close the choice is unmeasured."""
    if self.form != "auto":
      return self.form
    cost = {form: self._form_flops(form, seq_len).total() for form in ("quadratic", "chunk")}
    return "quadratic" if cost["quadratic"] <= cost["chunk"] else "chunk"

  def flops(self, seq_len: int) -> Flops:
    return self._form_flops(self.form_for(seq_len), seq_len)

  def _form_flops(self, form: str, seq_len: int) -> Flops:
    """Per token. ``"chunk"``: the q and k outer products of the Taylor map, then the chunked
    ``kernels.gla`` form on ``1 + d' + d'²`` features and ``d_head + 1`` value columns (the normaliser).
    ``"quadratic"``: over the causal half of the time × time scores (T/2 keys a token, the attention
    convention), ``q·k`` (2d'), the kernel ``1 + s + s²/2`` (4) and the product with ``[v | 1]``
    (2(d_head + 1))."""
    f = self.feature_dim
    if form == "quadratic":
      keys = seq_len / 2.0
      return Flops(recurrence=self.heads * keys * (2.0 * f + 4.0 + 2.0 * (self.head_dim + 1)))
    feature_map = 2.0 * self.heads * f * f
    return Flops(recurrence=feature_map + gla_flops(self.heads, 1 + f + f * f, self.head_dim + 1, self.chunk_size,
                                                    seq_len))
