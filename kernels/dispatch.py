"""Which implementation of each kernel family runs a call, and why every other one does not.

One place decides for every family (``scan``, ``gla``, ``delta``, ``attention``, ``dplr``,
``forgetting_attention``, ``modal``): ``xla``,
``pallas`` with its lowering, ``cudnn`` or ``reference``. The lowerings have one name each, here and
in every record: ``"triton"`` (GPU), ``"mosaic_gpu"`` (Hopper and newer: TMA and wgmma) and
``"mosaic_tpu"``. (``pallas_target`` still accepts ``"mosaic"``, its older name for ``"mosaic_tpu"``;
the scan's ``PallasConfig.gpu_kernel`` its ``"mosaic"`` for Mosaic GPU.)

Each implementation says whether it can run a call and why not (the ``supports`` / ``problem``
functions beside it, which the family's entry point evaluates into :class:`Candidate` verdicts);
the rules here order the candidates by what was measured fastest on each platform
(``kernels/BENCHMARKS.md``) and add the limits of those measurements. :func:`choose` then
- for ``"auto"`` takes the first candidate that can run and was measured there, and records every
  candidate passed over with its reason;
- for an explicit request runs that implementation or raises a ``ValueError`` naming why it cannot.
  One exception, recorded like the rest: GLA's ``"pallas"`` with the mLSTM input gate runs the XLA
  chunked form (:func:`gla`). Inside the Pallas scan, ``PallasConfig.gpu_kernel="mosaic"`` still
  takes Triton for a ragged or time-split call (``kernels/scan/pallas.py`` ``_resolve``).

Each family's entry point passes the choice it makes for a call through :func:`called`, so that a
:func:`recording` around a trace (the train step's first) keeps what every call ran, with the call's
shapes and dtypes: a model's layers may choose differently from one another and from the model-wide
choice (a wider head, float32 inputs).

The platform probes (:func:`backend`, :func:`tma_gpu`, :func:`gpu_sm_count`, :func:`nvidia_gpu`)
live here too, so every choice reads the platform the same way. This module imports no kernel: the
families import it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax

LOWERINGS = ("triton", "mosaic_gpu", "mosaic_tpu")
PALLAS_TARGETS = ("triton", "mosaic_tpu", "mosaic")  # "mosaic": the older name of "mosaic_tpu"
# The entry point each family's messages name.
LABELS = {"attention": "window_attention", "scan": "linear_scan", "gla": "gla", "delta": "delta_rule",
          "modal": "segmented_modal_conv"}
# Head dims the Pallas GLA and delta-rule kernels were measured at (H100); wider heads stay on XLA
# under "auto" (Based's 153-dim feature map, padded to 256, overflows the GLA output kernel's shared
# memory: 328 KB of the H100's 227 KB).
AUTO_MAX_HEAD_DIM = 128
# Head dims the attention's Mosaic GPU kernels were measured at (unpadded); cuDNN takes the others.
MOSAIC_GPU_ATTENTION_HEAD_DIMS = (64, 128)

_CPU_PALLAS = "on this platform Pallas kernels only interpret"
_TPU_UNMEASURED = "never timed on a TPU (export-tested only)"
# Float32 on a GPU: the Pallas GLA and attention kernels are tiled for 16-bit inputs, and at float32 the
# XLA forms were faster where measured (toy MQAR models on an H100; experiments/results/README.md).
_GPU_FLOAT32 = "float32 inputs: slower than xla where measured (tiled for 16-bit inputs)"


def _float32(dtype) -> bool:
  return dtype is not None and str(dtype) == "float32"



# --- the platform ------------------------------------------------------------------------------------


def backend() -> str:
  """The default backend: ``"gpu"``, ``"tpu"`` or ``"cpu"``."""
  return jax.default_backend()


def tma_gpu() -> bool:
  """Whether the default device is an NVIDIA GPU with TMA and wgmma (compute capability ≥ 9.0: Hopper
  or newer), where the Mosaic GPU kernels run."""
  device = jax.devices()[0]
  try:
    return device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 9.0
  except ValueError:
    return False


def nvidia_gpu() -> bool:
  """Whether the default backend is a CUDA GPU (not ROCm): where cuDNN runs."""
  if backend() != "gpu":
    return False
  return "rocm" not in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def gpu_sm_count() -> int:
  """Streaming multiprocessors of the default GPU (an H100's 132 where there is none: CPU tests)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 132


def pallas_layout(target: str | None, family: str) -> str | None:
  """A ``pallas_target`` as the kernels' layout name: None (decided at lowering time), ``"triton"``,
  or ``"mosaic"`` (the TPU layout); anything else is a ValueError naming the valid values."""
  if target is None:
    return None
  if target not in PALLAS_TARGETS:
    raise ValueError(f"{LABELS.get(family, family)}: pallas_target must be 'triton' or 'mosaic_tpu' "
                     f"('mosaic' is its older name), got {target!r}")
  return "triton" if target == "triton" else "mosaic"


def lowering_of(layout: str | None) -> str | None:
  """The lowering name of a kernel layout: ``"triton"``, ``"mosaic"`` → ``"mosaic_tpu"``; for None the
  one the platform's lowering will take (None on a CPU)."""
  if layout is None:
    return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(backend())
  return "triton" if layout == "triton" else "mosaic_tpu"


def mosaic_gpu_or_triton(requested: str | None, problem: str | None, *, interpret: bool, hopper: bool,
                         field: str) -> str:
  """A GPU kernel choice inside a Pallas lowering, "mosaic_gpu" or "triton": ``requested`` as given,
  or for None Mosaic GPU where it runs (``hopper``: ``tma_gpu()``, not interpreting, no ``problem``).
  Asking for "mosaic_gpu" where it cannot run is an error naming ``field`` (e.g. "gla:
  PallasConfig.out_kernel") and why."""
  if interpret:
    problem = "does not interpret (Mosaic GPU's interpreter has no wgmma)"
  if requested == "mosaic_gpu" and problem:
    raise ValueError(f"{field}='mosaic_gpu' {problem}; use 'triton'")
  if requested is None:
    return "mosaic_gpu" if not problem and hopper else "triton"
  return requested


# --- candidates and choices --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One implementation for one call: ``problem`` says why it cannot run the call (None: it can);
  ``unmeasured`` why ``"auto"`` passes it over although it can (None: measured fastest here)."""
  impl: str
  lowering: str | None = None
  problem: str | None = None
  unmeasured: str | None = None

  @property
  def name(self) -> str:
    return f"{self.impl}/{self.lowering}" if self.lowering else self.impl


@dataclasses.dataclass(frozen=True)
class Choice:
  """What runs (``impl``, ``lowering``), what was asked for, and each candidate not taken with why."""
  family: str
  requested: str
  impl: str
  lowering: str | None
  rejected: tuple[tuple[str, str], ...] = ()

  @property
  def name(self) -> str:
    return f"{self.impl}/{self.lowering}" if self.lowering else self.impl

  def record(self) -> dict:
    """The form ``summary.json`` keeps."""
    return {"requested": self.requested, "impl": self.impl, "lowering": self.lowering,
            "rejected": dict(self.rejected)}


def choose(family: str, requested: str, impls: tuple[str, ...], candidates: list[Candidate]) -> Choice:
  """The implementation of ``family`` that runs: the first candidate (they come fastest first) that
  can run and, for ``"auto"``, was measured here; for an explicit ``requested`` the first candidate
  of that implementation that can run, or a ValueError naming why none can."""
  label = LABELS.get(family, family)
  if requested not in impls:
    raise ValueError(f"{label}: unknown impl {requested!r}; valid: {impls}")
  if requested == "auto":
    rejected, chosen = [], None
    for c in candidates:
      reason = c.problem or c.unmeasured
      if chosen is None and reason is None:
        chosen = c
      elif chosen is None:
        rejected.append((c.name, reason))
      else:
        rejected.append((c.name, reason or f"measured slower than {chosen.name} here"))
    if chosen is None:  # (every rule lists xla, which runs everywhere)
      raise ValueError(f"{label}: no implementation runs this call: {dict(rejected)}")
    return Choice(family, requested, chosen.impl, chosen.lowering,
                  tuple((name, why) for name, why in rejected if name != chosen.name))
  mine = [c for c in candidates if c.impl == requested]
  chosen = next((c for c in mine if c.problem is None), None)
  if chosen is None:
    problem = mine[0].problem if mine else "is not available on this platform"
    other = "'pallas' or 'auto'" if requested == "cudnn" else "'auto'"
    raise ValueError(f"{label}: impl={requested!r} {problem}; use impl={other}")
  rejected = tuple((c.name, c.problem) for c in mine if c is not chosen and c.problem)
  return Choice(family, requested, chosen.impl, chosen.lowering, rejected)


# --- the record of the calls traced -------------------------------------------------------------------

# The lists of the active recordings, innermost last.
_RECORDINGS: contextvars.ContextVar[tuple[list[dict], ...]] = contextvars.ContextVar("recordings", default=())


@contextlib.contextmanager
def recording():
  """Keeps every choice made at a call site while active (:func:`called`), once per distinct call and
  outcome, in the order first made: yields the list, of ``{"family", "call", "requested", "impl",
  "lowering", "rejected"}`` (:meth:`Choice.record` plus the family and the call's arguments, e.g.
  ``"q=bfloat16[2,64,4,128], v=bfloat16[2,64,4,128]"``). Choices happen when a call is traced, so
  wrap the first call of a jitted function (a cached trace makes none). Nested recordings each keep
  the calls made inside them."""
  calls: list[dict] = []
  token = _RECORDINGS.set(_RECORDINGS.get() + (calls,))
  try:
    yield calls
  finally:
    _RECORDINGS.reset(token)


def _described(value) -> str:
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if shape is not None and dtype is not None:
    return f"{dtype}[{','.join(map(str, shape))}]"
  return repr(value)


def called(choice: Choice, **arguments) -> Choice:
  """``choice``, made by a family's entry point for one call, noted in every active :func:`recording`
  with the ``arguments`` it was made from (arrays as ``dtype[shape]``; None ones left out)."""
  recordings = _RECORDINGS.get()
  if recordings:
    call = ", ".join(f"{name}={_described(value)}" for name, value in arguments.items() if value is not None)
    entry = {"family": choice.family, "call": call, **choice.record()}
    for calls in recordings:
      if entry not in calls:
        calls.append(entry)
  return choice


def _tail() -> list[Candidate]:
  return [Candidate("xla"), Candidate("reference", unmeasured="the definition (sequential or dense), for tests")]


def _pallas(platform: str, interpret: bool, layout: str | None, *, gpu_measured: str | None,
            tpu_measured: str | None) -> list[Candidate]:
  """The Pallas candidate of a family whose layout is picked at lowering time (scan, GLA, delta rule).
  ``interpret`` names the lowering only: "auto" decides by platform, as it always has."""
  lowering = lowering_of(layout or ("triton" if interpret else None))
  unmeasured = {"gpu": gpu_measured, "tpu": tpu_measured}.get(platform, _CPU_PALLAS)
  # (on a CPU an explicit request stands: the host may lower for another platform, e.g. jax.export)
  return [Candidate("pallas", lowering, unmeasured=unmeasured)]


def _head_dims(d_k: int, d_v: int) -> str | None:
  if max(d_k, d_v) > AUTO_MAX_HEAD_DIM:
    return f"measured at head dims ≤ {AUTO_MAX_HEAD_DIM} only (got d_k {d_k}, d_v {d_v})"
  return None


# --- the rules, one per family -----------------------------------------------------------------------


def scan(requested: str, impls: tuple[str, ...], *, interpret: bool = False,
         mosaic_gpu_problem: str | None = None) -> Choice:
  """The diagonal scan: Pallas on GPU (Mosaic GPU where it runs, else Triton) and TPU, XLA elsewhere.
  ``mosaic_gpu_problem``: why the Mosaic GPU kernels cannot take the call (None: they can)."""
  platform = backend()
  if platform == "gpu":
    if interpret:
      mosaic_gpu_problem = "does not interpret (Mosaic GPU's interpreter has no wgmma)"
    problem = mosaic_gpu_problem or (None if tma_gpu() else "needs a Hopper GPU (TMA and wgmma)")
    pallas = [Candidate("pallas", "mosaic_gpu", problem=problem), Candidate("pallas", "triton")]
  else:  # (auto has taken the TPU kernels since they exist)
    pallas = _pallas(platform, interpret, None, gpu_measured=None, tpu_measured=None)
  return choose("scan", requested, impls, pallas + _tail())


def gla(requested: str, impls: tuple[str, ...], *, d_k: int, d_v: int, gated: bool = False,
        interpret: bool = False, layout: str | None = None, dtype=None) -> Choice:
  """Gated linear attention: Pallas on GPU for measured head dims and 16-bit inputs, the XLA chunked
  form elsewhere. ``gated``: the mLSTM input gate, which has no Pallas kernel (``"pallas"`` then runs
  ``"xla"``, recorded). ``dtype``: of q, k, v (None: not known, as 16-bit)."""
  gpu_measured = _head_dims(d_k, d_v) or (_GPU_FLOAT32 if _float32(dtype) else None)
  pallas = _pallas(backend(), interpret, layout, gpu_measured=gpu_measured, tpu_measured=_TPU_UNMEASURED)
  if gated:
    no_kernel = "has no kernel for the mLSTM input gate (log_input_gate)"
    pallas = [dataclasses.replace(c, problem=no_kernel) for c in pallas]
    if requested == "pallas":
      # The one request answered by another implementation: a model that asks for the Pallas GLA
      # kernels runs its mLSTM layers on the XLA chunked form (tests/test_pallas_gla.py pins this),
      # and the record says so.
      xla = choose("gla", "xla", impls, pallas + _tail())
      return dataclasses.replace(xla, requested=requested, rejected=((pallas[0].name, no_kernel),))
  return choose("gla", requested, impls, pallas + _tail())


def delta(requested: str, impls: tuple[str, ...], *, chunk_problem: str | None, d_k: int, d_v: int,
          interpret: bool = False, layout: str | None = None) -> Choice:
  """The delta rule: the Pallas state pass on GPU for chunks its tiles take (``chunk_problem``: why
  not) and measured head dims, the XLA chunked form elsewhere."""
  return _chunked("delta", requested, impls, chunk_problem=chunk_problem, interpret=interpret, layout=layout,
                  gpu_measured=_head_dims(d_k, d_v))


def _chunked(family: str, requested: str, impls: tuple[str, ...], *, chunk_problem: str | None,
             interpret: bool, layout: str | None, gpu_measured: str | None) -> Choice:
  """The delta-rule state pass's families (``delta``, ``dplr``): Pallas for chunks its tiles take."""
  pallas = _pallas(backend(), interpret, layout, gpu_measured=gpu_measured, tpu_measured=_TPU_UNMEASURED)
  pallas = [dataclasses.replace(c, problem=c.problem or chunk_problem) for c in pallas]
  return choose(family, requested, impls, pallas + _tail())


def _pallas_off_accelerator(platform: str, interpret: bool, layout: str | None) -> list[Candidate]:
  """The Pallas candidate on a host with neither GPU nor TPU: interpreted, or lowered for another
  platform (an explicit layout), else refused with how to interpret it."""
  if interpret or layout is not None:
    return [Candidate("pallas", lowering_of(layout or "triton"), unmeasured=_CPU_PALLAS)]
  return [Candidate("pallas", problem=f"needs a GPU or TPU (backend is {platform!r}); pass interpret=True "
                    "to run the kernel in the Pallas interpreter", unmeasured=_CPU_PALLAS)]


def attention(requested: str, impls: tuple[str, ...], *, head_dim: int, mosaic_gpu_problem: str | None,
              cudnn_problem: str | None, interpret: bool = False, layout: str | None = None,
              dtype=None) -> Choice:
  """Sliding-window attention. GPU: our Mosaic GPU kernels at the head dims they were measured at,
  then cuDNN, then our Triton kernels; TPU: Pallas; CPU: XLA. ``mosaic_gpu_problem`` /
  ``cudnn_problem``: why those cannot run the call (None: they can)."""
  platform = backend()
  if platform == "gpu":
    measured = (None if head_dim in MOSAIC_GPU_ATTENTION_HEAD_DIMS else
                f"measured at head_dim {' and '.join(map(str, MOSAIC_GPU_ATTENTION_HEAD_DIMS))} only (got {head_dim})")
    # Past cuDNN, "pallas" runs what PallasBlocks' defaults pick: Mosaic GPU wherever it can, else Triton.
    fallback = "triton" if mosaic_gpu_problem else "mosaic_gpu"
    pallas = [Candidate("pallas", "mosaic_gpu", problem=mosaic_gpu_problem, unmeasured=measured),
              Candidate("cudnn", problem=cudnn_problem),
              Candidate("pallas", fallback, unmeasured=_GPU_FLOAT32 if _float32(dtype) else None)]
  elif platform == "tpu":
    pallas = [Candidate("pallas", lowering_of(layout or "mosaic"))]
  else:
    pallas = _pallas_off_accelerator(platform, interpret, layout)
  if not any(c.impl == "cudnn" for c in pallas):
    pallas.append(Candidate("cudnn", problem=cudnn_problem))
  return choose("attention", requested, impls, pallas + _tail())


# The generalized delta rule's Pallas path: its chunk pass is the delta rule's kernel with a per-key
# decay and an added write, never yet timed against the XLA form on a GPU.
_DPLR_GPU_UNMEASURED = ("not yet measured faster than xla on a GPU (python -m kernels.dplr.bench); auto "
                        "stays xla until it is")


def dplr(requested: str, impls: tuple[str, ...], *, chunk_problem: str | None = None, interpret: bool = False,
         layout: str | None = None) -> Choice:
  """The generalized delta rule (``kernels.dplr``, diagonal-plus-rank-one transitions): the XLA chunked
  form under ``"auto"`` everywhere until the Pallas state pass is measured faster; ``"pallas"`` runs it
  (Triton on GPU, Mosaic TPU, interpreted where asked) for chunks its tiles take (``chunk_problem``:
  why not)."""
  return _chunked("dplr", requested, impls, chunk_problem=chunk_problem, interpret=interpret, layout=layout,
                  gpu_measured=_DPLR_GPU_UNMEASURED)


# Forgetting attention (FoX): the window-attention flash kernels with the bias c_i − c_j added tile by
# tile (kernels.forgetting_attention), never yet timed against its XLA band on a GPU.
_FOX_GPU_UNMEASURED = ("not yet measured faster than xla on a GPU (python -m kernels.forgetting_attention.bench); "
                       "auto stays xla until it is")
_FOX_NO_MOSAIC_GPU = "the Hopper Mosaic GPU window-attention kernels take no bias c_i − c_j; Triton runs it"


def forgetting_attention(requested: str, impls: tuple[str, ...], *, interpret: bool = False,
                         layout: str | None = None) -> Choice:
  """Forgetting attention (``kernels.forgetting_attention``): the XLA band under ``"auto"`` everywhere
  until the Pallas kernels are measured faster; ``"pallas"`` runs the Triton kernels on a GPU (the
  Mosaic GPU window kernels take no bias: recorded), Mosaic on a TPU, and on a CPU only interpreted
  (or lowered for another platform from this host)."""
  platform = backend()
  if platform == "gpu" and layout != "mosaic":
    pallas = [Candidate("pallas", "mosaic_gpu", problem=_FOX_NO_MOSAIC_GPU),
              Candidate("pallas", "triton", unmeasured=_FOX_GPU_UNMEASURED)]
  elif platform in ("gpu", "tpu"):
    pallas = [Candidate("pallas", lowering_of(layout or "mosaic"), unmeasured=_TPU_UNMEASURED)]
  else:
    pallas = _pallas_off_accelerator(platform, interpret, layout)
  return choose("forgetting_attention", requested, impls, pallas + _tail())


# The modal recurrence with document resets (kernels.modal): the streaming Triton kernels against the
# chunked XLA form of hybrids.longconv, never yet timed against each other on a GPU.
_MODAL_GPU_UNMEASURED = ("not yet measured faster than xla on a GPU (python -m hybrids.bench_longconv); auto "
                         "stays xla until it is")


def modal(requested: str, impls: tuple[str, ...], *, interpret: bool = False) -> Choice:
  """The long convolutions' packed-documents face (``kernels.modal``): the chunked XLA form under
  ``"auto"`` until the Pallas kernels are measured faster; ``"pallas"`` runs the Triton kernels on a GPU,
  the Mosaic ones on a TPU and, interpreted, either on a CPU."""
  platform = backend()
  if platform == "tpu":
    pallas = [Candidate("pallas", "mosaic_tpu", unmeasured=_TPU_UNMEASURED)]
  elif platform == "gpu":
    pallas = [Candidate("pallas", "triton", unmeasured=_MODAL_GPU_UNMEASURED)]
  else:
    pallas = _pallas_off_accelerator(platform, interpret, None)
  return choose("modal", requested, impls, pallas + _tail())
