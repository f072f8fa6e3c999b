r"""Study `transformers` (issue 18): SplitLBI selects the heads and MLP neurons of a
character-level GPT and of a ViT; W on supp Γ and the slim model, against controls.

Models and data (both Linen, :mod:`examples.models`):

- ``gpt``: a byte-level decoder (``GPT``) on the Debian ``fortunes`` corpus
  (:mod:`examples.text_pipeline`: fortune ``i`` is validation text when
  ``i % 10 == 9``); metric: validation bits per character (lower is better) on
  the first ``eval_windows`` windows of ``context`` bytes.
- ``vit``: a ViT (4×4 patches, class token) on Fashion-MNIST; metric: test
  accuracy on the 10 000 test images.

Per model and seed, four runs of ``steps`` steps, each with 100 warm-up steps
then a constant rate (``schedule="cosine"``: cosine decay to 0 at ``steps``),
the same data order:

- ``dense-adamw``: AdamW (rate ``adam_lr``, decoupled weight decay ``adam_wd``);
- ``dense-sgd``: SGD, momentum 0.9, weight decay ``sgd_wd``, rate ``sgd_lr``;
- ``splitlbi-sgd``: SplitLBI with the paper's momentum step (κ = 1, rate ``sgd_lr``);
- ``splitlbi-adam``: SplitLBI with ``direction=optax.scale_by_adam()`` (AdaBreg-
  type, decoupled weight decay ``adam_wd``, rate ``adam_lr``); ``coupling``
  ``"outside"`` (W' = W − κα·(d + β·W) − (κα/ν)·(W − Γ)) or ``"momentum"`` (the
  coupling gradient through Adam: d = Adam(∇L + (W − Γ)/ν)); ``dual``: the dual
  step through a second Adam, V' = V + α·Adam((W − Γ)/ν);
- ``narrow-adamw`` (where ``arms`` names it): AdamW from scratch on the model with
  half the heads and half the MLP neurons of every block (:func:`narrowed`), what the
  goal's structure (≤ 50 % of both) reaches in the same steps.

SplitLBI's penalty is :func:`optax_splitlbi.channel_groups`: one group per
attention head (its query, key and value columns and biases) and one per MLP
neuron (its ``mlp_in`` column and bias), threshold λ·√d (``adam_lam`` or
``sgd_lam``; the heads' λ ``heads_lam`` where set); embeddings, positions,
LayerNorms and the classifier are not penalized. At each of ``stops``:

- W (dense), W on supp Γ (no fine-tuning), and W on the mask after
  ``finetune_steps`` of AdamW with the mask fixed (with ``keep_one``, the default, a
  class with no group in supp Γ keeps its most important one: the rule the published
  tables were measured with, from before slimming took blocks without heads / neurons;
  without it, a block whose heads or neurons are all out of supp Γ loses them);
- the slim model (:func:`optax_splitlbi.slim_linen`): parameters, FLOPs and (in
  ``latency_run``) CPU latency against the dense model (interleaved medians, batch
  ``latency_batch``);
- for ``splitlbi-adam``, controls at its per-block head and neuron counts, on the
  ``dense-adamw`` weights of the same step: group magnitude (‖W_g‖ of the same
  groups), head / neuron importance (Michel et al. 2019: |∂L/∂ξ| of a gate ξ on
  the head's or neuron's output, = |⟨W_out,g, ∂L/∂W_out,g⟩| of its rows of the
  output projection, averaged over ``score_batches`` batches) and random, each
  without and with the same fine-tune.

After every run, ``<model>/latency`` (:func:`latency_run`) times all slim models
again against the dense one in one process, so that the table's speed-ups do not
depend on what else ran beside a run. The path (entry step of every head and neuron)
of seed 0 is plotted.

Settings ``small_init`` (``--settings small_init``): the blocks' kernels start at
N(0, 0.02²) (GPT-2's initialisation) instead of LeCun normal (std 1/√64 = 0.125).
V integrates W, so a group enters when ∫‖W_g‖ dt reaches λ·√d; with LeCun kernels
‖W_g‖ stays close to its initial value, nearly the same for every head and neuron,
and all groups enter within a few hundred steps in an order the initial draw
decides. With small kernels ‖W_g‖ is what training put there, so the order follows
what the task needs (ν = 10, λ = 0.01; AdamW and the SplitLBI Adam direction only).

Settings ``through`` (``--settings through``): ``small_init`` with the coupling
gradient through Adam (``coupling="momentum"``: d = Adam(∇L + (W − Γ)/ν)). W − Γ
then settles at −ν·∇L, so a group outside supp Γ shrinks to ν times its gradient
instead of keeping AdamW's size, and λ is in the gradient's units (ν = 100, the GPT
ν = 300, λ = 3·10⁻⁴). Its ``dense-adamw`` runs are the same as ``small_init``'s.

Settings ``narrow``: ``small_init``'s AdamW runs beside ``narrow-adamw``. Settings
``dual``: ``through`` with ``dual=True`` (V and Γ then move at Adam's speed instead of
by plain gradient steps of α: :mod:`optax_splitlbi.transform`), λ = 1.5 in W's units;
its ``dense-adamw`` and ``narrow-adamw`` runs are ``narrow``'s. Settings
``dual_fast``: ``dual`` with SplitLBI at twice the rate (``splitlbi_lr`` 6·10⁻³) and λ = 3
(the same λ/α); its dense and narrow runs are ``narrow``'s. Settings
``narrow_cosine``: ``narrow`` with a cosine decay of the rate to 0 at the last step (what
the goal's structure reaches at the end of a schedule).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_splitlbi as sl
from examples import text_pipeline
from examples.configs.base import Config
from examples.studies import common

MODELS = ("gpt", "vit")
ARMS = ("dense-adamw", "dense-sgd", "splitlbi-sgd", "splitlbi-adam")
NARROW = "narrow-adamw"  # AdamW from scratch on half the heads and neurons of every block
CONTROLS = ("magnitude", "importance", "random")
LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  models: tuple = MODELS
  arms: tuple = ARMS
  text_dir: str = text_pipeline.FORTUNES_DIR
  gpt: tuple = (("context", 64), ("d_model", 64), ("depth", 4), ("num_heads", 4),
                ("head_dim", 16), ("mlp_dim", 256))
  vit: tuple = (("patch", 4), ("d_model", 64), ("depth", 4), ("num_heads", 4),
                ("head_dim", 16), ("mlp_dim", 128))
  steps: int = 2000
  stops: tuple = (1400, 1600, 2000)
  gpt_batch: int = 32
  vit_batch: int = 64
  warmup: int = 100
  schedule: str = "constant"  # or "cosine"
  adam_lr: float = 3e-3
  splitlbi_lr: Optional[float] = None  # the SplitLBI Adam direction's rate where it differs
  adam_wd: float = 0.01
  sgd_lr: float = 0.05
  sgd_wd: float = 1e-4
  nu: float = 100.0
  gpt_nu: Optional[float] = None  # the GPT's ν where it differs (None: ``nu``)
  coupling: str = "outside"  # of the Adam direction: "outside" or "momentum" (through it)
  dual: bool = False  # the dual step preconditioned too: dual_direction=optax.scale_by_adam()
  adam_lam: float = 0.006
  heads_lam: Optional[float] = None  # λ of the head classes where it differs (Adam direction)
  sgd_lam: float = 0.063
  keep_one: bool = True  # a class with no group in supp Γ keeps its best group (``completed``)
  finetune_steps: int = 100
  finetune_lr: float = 1e-3
  score_batches: int = 8
  eval_windows: int = 512
  latency_batch: int = 64
  rounds: int = 15


# GPT-2's N(0, 0.02²) kernels in the blocks, the stops and the latency batch of
# ``small_init`` and the variants after it
_SMALL_INIT = dict(gpt=Settings.gpt + (("init_std", 0.02),),
                   vit=Settings.vit + (("init_std", 0.02),),
                   stops=(750, 1000, 1250, 1500, 2000), latency_batch=256)
# the capacity of the goal's structure: small_init's AdamW, beside the same model with
# half the heads and neurons of every block trained from scratch
_NARROW = Settings(**_SMALL_INIT, arms=("dense-adamw", NARROW))
# through, with Adam on the dual step as well (V' = V + α·Adam((W − Γ)/ν)): V moves at
# Adam's speed, in W's units (λ 1.5); the dense and narrow runs are narrow's
_DUAL = Settings(**_SMALL_INIT, arms=("dense-adamw", NARROW, "splitlbi-adam"), nu=100.0,
                 gpt_nu=300.0, coupling="momentum", dual=True, adam_lam=1.5)
SETTINGS = {"full": Settings(),
            # the ViT goal (≥ 88 %): dense AdamW, 10 000 steps (10.7 epochs), cosine decay
            "vit_long": Settings(models=("vit",), arms=("dense-adamw",), steps=10000,
                                 stops=(2000, 4000, 6000, 8000, 10000), schedule="cosine"),
            # the groups' norms at the start no longer set the order of entry (module
            # docstring); ν = 10, stops early enough for half the heads / neurons; latency
            # at batch 256 (the goal)
            "small_init": Settings(**_SMALL_INIT, arms=("dense-adamw", "splitlbi-adam"),
                                   nu=10.0, adam_lam=0.01),
            # small_init with the coupling gradient through Adam (d = Adam(∇L + (W − Γ)/ν)):
            # W − Γ settles at −ν·∇L, so λ is in the gradient's units (far smaller)
            "through": Settings(**_SMALL_INIT, arms=("dense-adamw", "splitlbi-adam"), nu=100.0,
                                gpt_nu=300.0, coupling="momentum", adam_lam=3e-4),
            "narrow": _NARROW,
            # narrow with a cosine decay to 0 at the last step: what half the heads and
            # neurons reach at the end of a schedule
            "narrow_cosine": dataclasses.replace(_NARROW, schedule="cosine"),
            "dual": _DUAL,
            # dual at twice the rate, λ doubled with it (the same λ/α): a sparser path
            "dual_fast": dataclasses.replace(_DUAL, adam_lam=3.0, splitlbi_lr=6e-3),
            "smoke": Settings(seeds=1, gpt=(("context", 16), ("d_model", 16), ("depth", 2),
                                            ("num_heads", 2), ("head_dim", 8), ("mlp_dim", 32)),
                              vit=(("patch", 7), ("d_model", 16), ("depth", 1), ("num_heads", 2),
                                   ("head_dim", 8), ("mlp_dim", 32)),
                              arms=ARMS + (NARROW,), steps=6, stops=(6,), gpt_batch=4,
                              vit_batch=8, warmup=2,
                              adam_lam=1e-4, heads_lam=2e-4, keep_one=False, sgd_lam=1e-3,
                              finetune_steps=2, score_batches=2,
                              eval_windows=8, latency_batch=4, rounds=2)}


# ------------------------------------------------------------------------ tasks


class Task:
  """A model with its data: training batches, the loss, the metric and a sample input.

  Attributes:
    name: ``"gpt"`` or ``"vit"``.
    model: the Linen module.
    metric_name: ``"bpc"`` (lower is better) or ``"accuracy"``.
    sample: an input batch for tracing and slimming.
    finetune_step: the compiled step of :func:`finetune`.
  """

  def __init__(self, s: Settings, name: str, dataset: str):
    from examples import models  # pylint: disable=g-import-not-at-top
    self.s, self.name = s, name
    if name == "gpt":
      kwargs = dict(s.gpt)
      self.model, self.batch = models.GPT(**kwargs), s.gpt_batch
      self.text, self.context = text_pipeline.load(s.text_dir), kwargs["context"]
      self.metric_name = "bpc"
      self.sample = jnp.zeros((2, self.context), jnp.int32)
    else:
      self.model, self.batch = models.ViT(num_classes=10, **dict(s.vit)), s.vit_batch
      self.images = _fashion(dataset)
      self.metric_name = "accuracy"
      self.sample = jnp.asarray(self.images["test_x"][:2])
    self._loss_sum = jax.jit(lambda p, b: self.losses(p, b).sum())
    self._predict = jax.jit(lambda p, x: jnp.argmax(self.model.apply({"params": p}, x), -1))
    self.finetune_step = None  # compiled by the first fine-tune

  def init(self, seed: int) -> Any:
    return jax.jit(lambda: self.model.init(jax.random.key(seed), self.sample)["params"])()

  def losses(self, params: Any, batch: dict) -> jax.Array:
    """Cross-entropy per token (GPT) or per image (ViT)."""
    logits = self.model.apply({"params": params}, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])

  def batches(self, seed: int) -> Iterator[dict]:
    """Endless training batches of ``seed``'s order."""
    if self.name == "gpt":
      yield from text_pipeline.train_batches(self.text.train, self.batch, self.context, seed)
    rng, x, y = np.random.default_rng(seed), self.images["train_x"], self.images["train_y"]
    while True:
      for i in np.split(rng.permutation(len(x))[:len(x) // self.batch * self.batch],
                        len(x) // self.batch):
        yield {"inputs": x[i], "targets": y[i]}

  def metric(self, params: Any) -> float:
    """Validation bits per character (GPT) or test accuracy (ViT)."""
    if self.name == "gpt":
      total, count = 0.0, 0
      for b in text_pipeline.eval_batches(self.text.valid, 64, self.context,
                                          self.s.eval_windows):
        total += float(self._loss_sum(params, b))
        count += b["targets"].size
      return total / count / LOG2
    x, y = self.images["test_x"], self.images["test_y"]
    correct = sum(int(np.sum(np.asarray(self._predict(params, x[i:i + 500])) == y[i:i + 500]))
                  for i in range(0, len(x), 500))
    return correct / len(x)


def _fashion(dataset: str) -> dict:
  """Fashion-MNIST (IDX files of ``idx:<dir>``) as normalised 28×28×1 float32 images."""
  from examples import input_pipeline  # pylint: disable=g-import-not-at-top
  if not dataset.startswith("idx:"):
    raise ValueError(f"study transformers reads IDX files (--data idx:<dir>), got {dataset!r}.")
  d = os.path.expanduser(dataset[4:])
  read = lambda f: input_pipeline.read_idx(os.path.join(d, f))  # noqa: E731
  norm = lambda x: ((x.astype(np.float32) / 255.0 - 0.286) / 0.353)[..., None]  # noqa: E731
  return {"train_x": norm(read("train-images-idx3-ubyte.gz")),
          "train_y": read("train-labels-idx1-ubyte.gz").astype(np.int32),
          "test_x": norm(read("t10k-images-idx3-ubyte.gz")),
          "test_y": read("t10k-labels-idx1-ubyte.gz").astype(np.int32)}


# ------------------------------------------------------------------- optimizers


def penalty(task: Task, lam: float, heads_lam: Optional[float] = None) -> sl.ChannelGroups:
  """One group per head and per MLP neuron (threshold λ·√d, the heads' λ ``heads_lam``
  where given); nothing else penalized."""
  groups = sl.channel_groups(lambda v, x: task.model.apply(v, x), {"params": task.init(0)},
                             task.sample, lam=lam, normalized=True,
                             rest=lambda path, leaf: None)
  if heads_lam is None:
    return groups
  return dataclasses.replace(groups, classes=[
      dataclasses.replace(c, lam=heads_lam) if kind(c) == "heads" else c
      for c in groups.classes])


def peak_rate(s: Settings, arm: str) -> float:
  """The rate of ``arm`` after the warm-up: ``adam_lr`` for the Adam arms (SplitLBI's
  Adam direction: ``splitlbi_lr`` where set), ``sgd_lr`` for the others."""
  if arm == "splitlbi-adam" and s.splitlbi_lr is not None:
    return s.splitlbi_lr
  return s.adam_lr if arm.endswith("adam") or arm.endswith("adamw") else s.sgd_lr


def optimizer(s: Settings, arm: str, task: Task) -> optax.GradientTransformation:
  """The optax transformation of ``arm`` (module docstring)."""
  peak = peak_rate(s, arm)
  lr = (optax.warmup_cosine_decay_schedule(0.0, peak, s.warmup, s.steps)
        if s.schedule == "cosine" else optax.warmup_constant_schedule(0.0, peak, s.warmup))
  if arm in ("dense-adamw", NARROW):
    return optax.adamw(lr, weight_decay=s.adam_wd)
  if arm == "dense-sgd":
    return optax.chain(optax.add_decayed_weights(s.sgd_wd), optax.sgd(lr, momentum=0.9))
  if arm == "splitlbi-adam":
    nu = s.gpt_nu if task.name == "gpt" and s.gpt_nu is not None else s.nu
    return sl.splitlbi(lr, kappa=1.0, nu=nu, lam=s.adam_lam,
                       penalty=penalty(task, s.adam_lam, s.heads_lam),
                       direction=optax.scale_by_adam(), weight_decay=s.adam_wd,
                       coupling=s.coupling, record_path=True,
                       dual_direction=optax.scale_by_adam() if s.dual else None)
  return sl.splitlbi(lr, kappa=1.0, nu=s.nu, lam=s.sgd_lam, penalty=penalty(task, s.sgd_lam),
                     momentum=0.9, weight_decay=s.sgd_wd, record_path=True)


def train(task: Task, tx: optax.GradientTransformation, params: Any, seed: int, steps: int,
          stops: tuple, on_stop: Callable[[int, Any, Any], None]) -> list[float]:
  """``steps`` steps from ``params`` on the batches of ``seed``; ``on_stop(step, params,
  opt_state)`` at the stops; the mean training loss (bits) of every 50 steps."""
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: task.losses(p, batch).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batches, losses, trace = task.batches(seed), [], []
  for i in range(1, steps + 1):
    params, opt_state, loss = step(params, opt_state, next(batches))
    losses.append(loss)
    if i % 50 == 0 or i == steps:
      trace.append(float(np.mean(jax.device_get(losses))) / LOG2)
      losses = []
    if i in stops:
      on_stop(i, jax.device_get(params), jax.device_get(opt_state))
  return trace


def finetune(task: Task, params: Any, masks: Any, seed: int) -> Any:
  """``finetune_steps`` of AdamW on W ∘ masks with the masks fixed (the updates masked,
  as :func:`optax_splitlbi.masked_updates` does; the masks are arguments of one compiled
  step, shared by every fine-tune of the task)."""
  s = task.s
  tx = optax.adamw(s.finetune_lr, weight_decay=s.adam_wd)
  if task.finetune_step is None:
    def step(params, opt_state, masks, batch):
      grads = jax.grad(lambda p: task.losses(p, batch).mean())(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return sl.apply_masks(optax.apply_updates(params, updates), masks), opt_state
    task.finetune_step = jax.jit(step)
  params = sl.apply_masks(params, masks)
  opt_state, batches = tx.init(params), task.batches(10_000 + seed)
  for _ in range(s.finetune_steps):
    params, opt_state = task.finetune_step(params, opt_state, masks, next(batches))
  return jax.device_get(params)


# ----------------------------------------------------------------- structures


def _flat(tree: Any) -> dict[str, Any]:
  """``{"block_0/mlp_in/kernel": leaf}`` of a params tree."""
  return {sl.penalties.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def kind(cls: sl.GroupClass) -> str:
  """``"heads"`` or ``"neurons"`` (the class of an attention or an MLP layer)."""
  return "neurons" if "mlp" in cls.name else "heads"


def kept(groups: sl.ChannelGroups, masks: Any) -> dict[str, np.ndarray]:
  """Per class, which groups ``masks`` keep (read from the first member's mask)."""
  flat = _flat(masks)
  out = {}
  for cls in groups.classes:
    path, axis = cls.members[0]
    m = np.moveaxis(np.asarray(flat[path]), axis, 0)
    out[cls.name] = m.reshape(cls.size, -1).any(1)
  return out


def masks_of(groups: sl.ChannelGroups, params: Any, keep: dict[str, np.ndarray]) -> Any:
  """Masks keeping group ``keep[class][g]`` of every member; ``None`` outside the classes."""
  member = {p: (cls.name, a) for cls in groups.classes for p, a in cls.members}

  def mask(path, leaf):
    name = sl.penalties.path_str(path)
    if name not in member:
      return None
    cls, axis = member[name]
    shape = [1] * leaf.ndim
    shape[axis] = leaf.shape[axis]
    return np.broadcast_to(keep[cls].reshape(shape), leaf.shape)

  return jax.tree_util.tree_map_with_path(mask, params)


def completed(keep: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> dict:
  """``keep`` where a class keeping no group keeps its highest-scoring one (a block keeps
  a head and a neuron: the published tables' rule; slimming takes blocks without)."""
  out = {}
  for name, k in keep.items():
    out[name] = k.copy()
    if not k.any():
      out[name][int(np.argmax(scores[name]))] = True
  return out


def top(scores: dict[str, np.ndarray], counts: dict[str, int]) -> dict[str, np.ndarray]:
  """Per class, the ``counts[class]`` highest-scoring groups."""
  out = {}
  for name, sc in scores.items():
    k = np.zeros(sc.size, bool)
    k[np.argsort(-sc, kind="stable")[:counts[name]]] = True
    out[name] = k
  return out


def magnitude_scores(groups: sl.ChannelGroups, params: Any) -> dict[str, np.ndarray]:
  """‖W_g‖₂ over every member slice of group g."""
  flat, out = _flat(params), {}
  for cls in groups.classes:
    sq = sum((np.moveaxis(np.asarray(flat[p], np.float64), a, 0).reshape(cls.size, -1) ** 2
              ).sum(1) for p, a in cls.members)
    out[cls.name] = np.sqrt(sq)
  return out


def consumer(cls: sl.GroupClass) -> str:
  """The output projection that reads the class: the rows of a head or neuron."""
  block = cls.name.split("/")[0]
  return f"{block}/mlp_out/kernel" if kind(cls) == "neurons" else f"{block}/attn/out/kernel"


def importance_scores(task: Task, groups: sl.ChannelGroups, params: Any,
                      seed: int) -> dict[str, np.ndarray]:
  """Michel et al. (2019): I_g = mean over batches of |∂L/∂ξ_g|, ξ_g a gate on the
  output of head / neuron g; ∂L/∂ξ_g = ⟨W_out[g], ∂L/∂W_out[g]⟩ (its output rows)."""
  grad = jax.jit(jax.grad(lambda p, b: task.losses(p, b).mean()))
  batches, flat_w = task.batches(20_000 + seed), _flat(params)
  out = {cls.name: np.zeros(cls.size) for cls in groups.classes}
  for _ in range(task.s.score_batches):
    flat_g = _flat(jax.device_get(grad(params, next(batches))))
    for cls in groups.classes:
      w, g = np.asarray(flat_w[consumer(cls)]), np.asarray(flat_g[consumer(cls)])
      out[cls.name] += np.abs((w * g).reshape(cls.size, -1).sum(1)) / task.s.score_batches
  return out


# ------------------------------------------------------------------------- runs


@functools.lru_cache(maxsize=2)
def _task(s: Settings, name: str, dataset: str) -> Task:
  return Task(s, name, dataset)


def _snapshot(run_dir: str, step: int) -> str:
  return os.path.join(run_dir, f"stop{step}.msgpack")


def _count(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def narrowed(task: Task) -> dict:
  """Gives ``task`` half the heads and half the MLP neurons of every block (the most
  that W on supp Γ may keep in the issue's goal), to train from scratch: what that
  structure reaches in the same steps. Returns its heads, neurons and params share."""
  m, full = task.model, _count(task.init(0))
  if m.num_heads < 2 or (m.num_kv_heads or 2) < 2:
    raise ValueError(f"narrow-adamw: num_heads={m.num_heads}, num_kv_heads={m.num_kv_heads}:"
                     " halving needs at least 2 of each.")
  task.model = m.clone(num_heads=m.num_heads // 2, mlp_dim=m.mlp_dim // 2,
                       num_kv_heads=m.num_kv_heads and m.num_kv_heads // 2)
  return {"heads": [m.num_heads // 2] * m.depth, "neurons": [m.mlp_dim // 2] * m.depth,
          "params_share": _count(task.init(0)) / full}


def dense_run(s: Settings, model: str, arm: str, config: Config, run_dir: str) -> dict:
  """A dense baseline: the metric at every stop (AdamW: W saved there for the controls;
  ``narrow-adamw``: the model of :func:`narrowed`)."""
  # narrow-adamw: a task of its own (narrowed changes its model; _task's are shared)
  task = Task(s, model, config.dataset) if arm == NARROW else _task(s, model, config.dataset)
  rows, structure = [], narrowed(task) if arm == NARROW else {}

  def on_stop(step, params, opt_state):
    del opt_state
    rows.append({"step": step, "dense": task.metric(params), **structure})
    if arm == "dense-adamw":
      with open(_snapshot(run_dir, step), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(params))

  trace = train(task, optimizer(s, arm, task), task.init(config.seed), config.seed, s.steps,
                tuple(s.stops), on_stop)
  return {"loss_trace": trace, "stops": rows}


def slim_summary(task: Task, params: Any, masks: Any) -> dict:
  """The slim model of W ∘ masks: parameters, FLOPs per example, its relative error."""
  r, n = sl.slim_linen(task.model, {"params": params}, masks, task.sample).report, \
      task.sample.shape[0]
  return {"params_dense": r["params"]["dense"], "params_slim": r["params"]["slim"],
          "flops_dense": r["flops"]["dense"] / n, "flops_slim": r["flops"]["slim"] / n,
          "slim_error": r["max_abs_diff"] / max(1e-12, r["max_abs_output"])}


def controls(task: Task, groups: sl.ChannelGroups, keep: dict, step: int, seed: int,
             dense_dir: str) -> dict:
  """Magnitude, importance and random masks with ``keep``'s per-class counts on the dense
  AdamW weights of ``step``: the metric without and with the fine-tune."""
  with open(_snapshot(dense_dir, step), "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  counts = {name: int(k.sum()) for name, k in keep.items()}
  rng = np.random.default_rng(1_000 * seed + step)
  scores = {"magnitude": magnitude_scores(groups, params),
            "importance": importance_scores(task, groups, params, seed),
            "random": {name: rng.random(k.size) for name, k in keep.items()}}
  out = {}
  for name, sc in scores.items():
    masks = masks_of(groups, params, top(sc, counts))
    out[name] = {"pruned": task.metric(sl.apply_masks(params, masks)),
                 "finetuned": task.metric(finetune(task, params, masks, seed))}
  return out


def per_class(groups: sl.ChannelGroups, tree: Any) -> dict[str, np.ndarray]:
  """A keepdims per-group tree (e.g. ``entry_steps``) as one vector per class."""
  flat = _flat(jax.device_get(tree))
  return {cls.name: np.asarray(flat[cls.members[0][0]]).reshape(cls.size)
          for cls in groups.classes}


def _stop(task: Task, arm: str, groups: sl.ChannelGroups, step: int, params: Any,
          opt_state: Any, run_dir: str, seed: int) -> dict:
  """The measurements of a SplitLBI run at one stop (module docstring)."""
  keep = kept(groups, sl.support(opt_state))
  if task.s.keep_one:
    keep = completed(keep, magnitude_scores(groups, sl.find_state(opt_state).v))
  masks = masks_of(groups, params, keep)
  row = {"step": step, **slim_summary(task, params, masks),
         "heads": [int(keep[c.name].sum()) for c in groups.classes if kind(c) == "heads"],
         "neurons": [int(keep[c.name].sum()) for c in groups.classes if kind(c) == "neurons"],
         "dense": task.metric(params),
         "sparse": task.metric(sl.sparse_params(params, opt_state)),
         "finetuned": task.metric(finetune(task, params, masks, seed)),
         "entry": {n: v.tolist() for n, v in per_class(groups, sl.entry_steps(opt_state)).items()}}
  if arm == "splitlbi-adam":
    dense_dir = os.path.join(os.path.dirname(os.path.dirname(run_dir)), "dense-adamw",
                             f"seed{seed}")
    row["controls"] = controls(task, groups, keep, step, seed, dense_dir)
  return row


def splitlbi_run(s: Settings, model: str, arm: str, config: Config, run_dir: str) -> dict:
  """A SplitLBI run: the measurements of every stop (timed later by :func:`latency_run`)."""
  task, seed = _task(s, model, config.dataset), config.seed
  tx = optimizer(s, arm, task)
  groups = penalty(task, 1.0)
  rows = []

  def on_stop(step, params, opt_state):
    rows.append(_stop(task, arm, groups, step, params, opt_state, run_dir, seed))

  trace = train(task, tx, task.init(seed), seed, s.steps, tuple(s.stops), on_stop)
  return {"loss_trace": trace, "stops": rows}


def _latency(task: Task, params: Any, slims: dict) -> dict[str, float]:
  """Median CPU latency (s) of the dense and every slim model, interleaved."""
  from benchmarks import common as bench  # pylint: disable=g-import-not-at-top
  from benchmarks.slim import Forward  # pylint: disable=g-import-not-at-top
  rng, n = np.random.default_rng(1), task.s.latency_batch
  x = (jnp.asarray(rng.integers(0, 256, (n, task.context)), jnp.int32) if task.name == "gpt"
       else jnp.asarray(rng.normal(size=(n, 28, 28, 1)), jnp.float32))
  fwd = {"dense": Forward(task.model, {"params": params}, x)}
  fwd.update({k: Forward(m, v, x) for k, (m, v) in slims.items()})
  times = bench.interleaved(fwd, rounds=task.s.rounds, warmup=1)
  return {k: float(np.median(v)) for k, v in times.items()}


def latency_run(s: Settings, model: str, config: Config, run_dir: str) -> dict:
  """The slim models of every SplitLBI run timed again, in this process alone.

  Timed apart from the training runs, which may share the CPU with one another (two
  runs at once on two cores: the XLA thread pools contend). Each
  stop's per-block heads and MLP widths (from the runs' results) are rebuilt with
  random weights, their XLA FLOPs checked against the recorded ones, and all of them
  timed against the dense model, interleaved.

  Returns:
    ``dense`` (s), ``slim`` ({``"<arm>/seed<i>/stop<step>"``: s}), ``flops_rel_diff``
    (largest relative FLOP difference to the runs' slim models).
  """
  task, model_dir = _task(s, model, config.dataset), os.path.dirname(run_dir)
  slims, diff = {}, 0.0
  for arm in (a for a in s.arms if a.startswith("splitlbi")):
    for seed in common.seeds_of(s.seeds):
      with open(os.path.join(model_dir, arm, f"seed{seed}", "result.json")) as f:
        stops = json.load(f)["stops"]
      for row in stops:
        slim = task.model.clone(block_heads=tuple(row["heads"]),
                                block_kv_heads=tuple(row["heads"]),
                                block_mlp=tuple(row["neurons"]))
        variables = jax.jit(lambda m=slim: m.init(jax.random.key(0), task.sample))()
        flops = sl.slimming.report.cost(slim.apply, variables, task.sample)[0]
        diff = max(diff, abs(flops / task.sample.shape[0] / row["flops_slim"] - 1.0))
        slims[f"{arm}/seed{seed}/stop{row['step']}"] = (slim, variables)
  times = _latency(task, task.init(0), slims)
  return {"dense": times.pop("dense"), "slim": times, "flops_rel_diff": diff}


def runs(s: Settings, dataset: str) -> list[common.Run]:
  """Per seed and model: the dense baselines first (the controls read AdamW's W)."""
  out = []
  for seed in common.seeds_of(s.seeds):
    for model in s.models:
      for arm in s.arms:
        execute = splitlbi_run if arm.startswith("splitlbi") else dense_run
        config = Config(name=f"transformers/{model}/{arm}", dataset=dataset, model=model,
                        seed=seed, optimizer=arm, progress=False)
        out.append(common.Run(f"{model}/{arm}/seed{seed}", config,
                              execute=functools.partial(execute, s, model, arm),
                              keep_files=True))
  if any(arm.startswith("splitlbi") for arm in s.arms):
    for model in s.models:  # after every run, alone (latency_run)
      config = Config(name=f"transformers/{model}/latency", dataset=dataset, model=model,
                      progress=False)
      out.append(common.Run(f"{model}/latency", config, keep_files=True,
                            execute=functools.partial(latency_run, s, model)))
  return out


# ----------------------------------------------------------------------- report


def _metric(model: str, values, digits: int = 3) -> str:
  """bits per character as they are; accuracy in %."""
  return common.fmt(values, scale=1.0, digits=digits) if model == "gpt" else common.fmt(
      values, digits=2)


def _seeds(s: Settings, results: dict, model: str, arm: str) -> list[dict]:
  return [results[k] for k in (f"{model}/{arm}/seed{i}" for i in common.seeds_of(s.seeds))
          if k in results]


def _at(rows: list[dict], step: int, key: str) -> list:
  return [r[key] for res in rows for r in res["stops"] if r["step"] == step and key in r]


def _speedups(s: Settings, results: dict, model: str, arm: str, step: int) -> list[float]:
  """Dense ÷ slim latency per seed, as :func:`latency_run` timed them."""
  quiet = results.get(f"{model}/latency", {"slim": {}})
  return [quiet["dense"] / quiet["slim"][k] for k in
          (f"{arm}/seed{i}/stop{step}" for i in common.seeds_of(s.seeds)) if k in quiet["slim"]]


def _stop_table(s: Settings, results: dict, model: str) -> str:
  """Every arm at every stop: structure, size, speed and the metric (mean ± sd)."""
  rows = []
  for arm in s.arms:
    per_seed = _seeds(s, results, model, arm)
    for step in s.stops:
      if not _at(per_seed, step, "dense"):
        continue
      sparse, sized = arm.startswith("splitlbi"), arm.startswith("splitlbi") or arm == NARROW
      heads, neurons = _at(per_seed, step, "heads"), _at(per_seed, step, "neurons")
      ratio = lambda a, b: [x / y for x, y in zip(_at(per_seed, step, a),  # noqa: E731
                                                  _at(per_seed, step, b))]
      share = ratio("params_slim", "params_dense") if sparse else _at(per_seed, step,
                                                                       "params_share")
      lat = _speedups(s, results, model, arm, step)
      rows.append([arm, step,
                   common.fmt([sum(h) for h in heads], 1, 1) if sized else "all",
                   common.fmt([sum(n) for n in neurons], 1, 0) if sized else "all",
                   common.fmt(share, 100, 1) if sized else "100",
                   common.fmt(ratio("flops_dense", "flops_slim"), 1, 2) if sparse else
                   "–" if sized else "1",
                   common.fmt(lat, 1, 2) if sparse else "–" if sized else "1",
                   _metric(model, _at(per_seed, step, "dense")),
                   _metric(model, _at(per_seed, step, "sparse")) if sparse else "–",
                   _metric(model, _at(per_seed, step, "finetuned")) if sparse else "–"])
  m = "bits / char" if model == "gpt" else "accuracy %"
  return common.markdown_table(
      ["run", "step", "heads kept", "neurons kept", "params % of dense", "FLOPs ÷",
       "CPU latency ÷", f"W: {m}", f"W on supp Γ: {m}", f"fine-tuned: {m}"], rows)


def _controls_table(s: Settings, results: dict, model: str) -> str:
  """SplitLBI (Adam direction) against the controls at its structure."""
  per_seed = _seeds(s, results, model, "splitlbi-adam")
  dense = _seeds(s, results, model, "dense-adamw")
  narrow = _seeds(s, results, model, NARROW) if NARROW in s.arms else None
  rows = []
  for step in s.stops:
    ctl = _at(per_seed, step, "controls")
    if not ctl:
      continue
    row = [step, _metric(model, _at(dense, step, "dense"))]
    row += [_metric(model, _at(narrow, step, "dense"))] if narrow is not None else []
    row += [_metric(model, _at(per_seed, step, "sparse")),
            _metric(model, _at(per_seed, step, "finetuned"))]
    for name in CONTROLS:
      row += [_metric(model, [c[name]["pruned"] for c in ctl]),
              _metric(model, [c[name]["finetuned"] for c in ctl])]
    rows.append(row)
  header = ["step", "dense AdamW W"] + (["narrow AdamW (½ heads, ½ neurons)"] if narrow
                                         is not None else [])
  header += ["SplitLBI W on supp Γ", "SplitLBI fine-tuned"]
  for name in CONTROLS:
    header += [f"{name}", f"{name} + fine-tune"]
  return common.markdown_table(header, rows)


def plot(s: Settings, results: dict, target: str) -> str:
  """Seed 0's path: the entry step of every head (per block) and the fraction of every
  block's MLP neurons in supp Γ over the steps, for both SplitLBI directions."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(s.models), 2, figsize=(11, 3.4 * len(s.models)), squeeze=False)
  steps = np.arange(s.steps + 1)
  for row, model in zip(axes, s.models):
    for arm, marker, style in (("splitlbi-adam", "o", "-"), ("splitlbi-sgd", "x", "--")):
      res = results.get(f"{model}/{arm}/seed0")
      if not res:
        continue
      entry = res["stops"][-1]["entry"]
      heads = [np.asarray(v) for n, v in entry.items() if "mlp" not in n]
      neurons = [np.asarray(v) for n, v in entry.items() if "mlp" in n]
      for b, e in enumerate(heads):
        e = e[e >= 0]
        row[0].scatter(e, np.full(e.shape, b) + (0.15 if marker == "x" else -0.15),
                       marker=marker, color=f"C{b}", label=arm if b == 0 else None)
      for b, e in enumerate(neurons):
        frac = [(np.asarray(e)[np.asarray(e) >= 0] <= t).sum() / e.size for t in steps]
        row[1].plot(steps, frac, style, color=f"C{b}", label=f"{arm} block {b}")
    row[0].set(title=f"{model}: heads entering supp Γ", xlabel="step", ylabel="block",
               xlim=(0, s.steps))
    row[1].set(title=f"{model}: MLP neurons in supp Γ", xlabel="step", ylabel="fraction")
    row[0].legend(fontsize=7)
    row[1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(target, dpi=110)
  plt.close(fig)
  return target


def report(s: Settings, results: dict, out: str) -> str:
  """The study's markdown: per model the stop table and the controls; the path plot."""
  parts = []
  if any(arm.startswith("splitlbi") for arm in s.arms):
    png = plot(s, results, os.path.join(out, "transformers_path.png"))
    parts.append(f"![path]({os.path.basename(png)})\n")
  for model in s.models:
    name = "GPT on fortunes (validation bits / char)" if model == "gpt" else \
        "ViT on Fashion-MNIST (test accuracy %)"
    parts += [f"## {name}\n", _stop_table(s, results, model)]
    quiet = results.get(f"{model}/latency")
    if quiet:
      parts.append(f"\nCPU latency ÷ at batch {s.latency_batch}: every slim model rebuilt at its "
                   "per-block widths and timed against the dense one in one process after "
                   f"training (1-minute load average {quiet['load'][0]:.1f} before, "
                   f"{quiet['load'][1]:.1f} after; dense {quiet['dense'] * 1e3:.1f} ms).\n")
    if "splitlbi-adam" in s.arms:
      parts += [f"\nControls at SplitLBI (Adam direction)'s heads and neurons per block, on "
                "the dense AdamW weights of the same step:\n", _controls_table(s, results, model)]
  return "\n".join(parts)
