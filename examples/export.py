"""Ship a (slim) model: its architecture and its weights in one directory.

``save(directory, module, variables, sample_input=x)`` (Linen) or
``save(directory, model)`` (NNX) writes

- ``architecture.json``: how to rebuild the model. Linen: the module's class
  (``"examples.models:GPT"``) and its dataclass attributes (tuples as lists),
  plus the shape and dtype of one input example (``init`` needs it to know the
  variable shapes, e.g. a ViT's positions). NNX: the class and the constructor
  arguments, derived from the parameter shapes by a describer registered for
  the class (:func:`register_nnx`; the NNX ``GPT`` of
  ``examples/transformers_nnx.py`` is registered), because a slimmed NNX model
  keeps its per-block sizes only in its arrays.
- ``variables/``: an orbax checkpoint of the arrays (Linen: the variables,
  ``{"params": ..., ...}``; NNX: ``nnx.state(model, nnx.Param)`` as a pure dict).

``load(directory)`` imports the class by its recorded path, constructs it,
builds the abstract variables (``jax.eval_shape`` of ``init`` / ``nnx.eval_shape``
of the constructor), checks that every stored array has the shape and dtype the
rebuilt architecture expects and restores into them: ``(module, variables)`` for
Linen, the model for NNX. The model's code must be importable where it is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from examples import transformers_nnx

ARCHITECTURE = "architecture.json"
VARIABLES = "variables"
FORMAT = 1

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------- architecture


def class_path(cls: type) -> str:
  """``"module:QualName"`` of ``cls``, checked to import back to ``cls``.

  Args:
    cls: a class defined at the top level of an importable module.

  Returns:
    The path :func:`import_class` resolves.

  Raises:
    ValueError: naming the class, when it is defined in ``__main__``, inside a
      function, or is not what its path imports.
  """
  path = f"{cls.__module__}:{cls.__qualname__}"
  if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
    raise ValueError(f"Cannot describe {cls.__qualname__} ({path}): its class must live at "
                     "the top level of an importable module to be loaded elsewhere.")
  try:
    found = import_class(path)
  except ValueError as err:
    raise ValueError(f"Cannot describe {cls.__qualname__}: {err}") from None
  if found is not cls:
    raise ValueError(f"Cannot describe {cls.__qualname__}: {path} imports another object.")
  return path


def import_class(path: str) -> type:
  """The class at ``"module:QualName"``.

  Args:
    path: as written by :func:`class_path`.

  Returns:
    The class.

  Raises:
    ValueError: naming ``path`` when it is malformed or does not import.
  """
  module_name, sep, qualname = path.partition(":")
  if not sep or not module_name or not qualname:
    raise ValueError(f"Class path {path!r} is not 'module:ClassName'.")
  try:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as err:
    raise ValueError(f"Class path {path!r} cannot be imported ({err}); the model's code "
                     "must be importable (e.g. on PYTHONPATH) where it is loaded.") from None
  if not isinstance(obj, type):
    raise ValueError(f"Class path {path!r} is not a class.")
  return obj


def _to_json(value: Any, where: str) -> Any:
  """``value`` as JSON data (tuples as lists); ``ValueError`` naming ``where``."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (tuple, list)):
    return [_to_json(v, where) for v in value]
  if isinstance(value, dict) and all(isinstance(k, str) for k in value):
    return {k: _to_json(v, where) for k, v in value.items()}
  raise ValueError(f"Cannot describe {where}: a {type(value).__name__} ({value!r}) is not "
                   "JSON data (None, bool, int, float, str, lists, str-keyed dicts).")


def _from_json(value: Any) -> Any:
  """JSON data back as attributes: lists become tuples (recursively)."""
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
  return value


def linen_attributes(module: nn.Module) -> dict[str, Any]:
  """The constructor attributes of a Linen module as JSON data.

  Args:
    module: an unbound Linen module (a dataclass).

  Returns:
    Every init field but ``parent`` and ``name``, tuples as lists.

  Raises:
    ValueError: naming the class and attribute whose value is not JSON data
      (e.g. a class such as a ResNet's ``block``).
  """
  name = type(module).__name__
  return {f.name: _to_json(getattr(module, f.name), f"{name}.{f.name}")
          for f in dataclasses.fields(module) if f.init and f.name not in ("parent", "name")}


def describe_nnx_gpt(model: transformers_nnx.GPT) -> dict[str, Any]:
  """The constructor arguments of an NNX ``GPT``, read from its parameter shapes.

  Args:
    model: a :class:`examples.transformers_nnx.GPT`, dense or slimmed (per-block
      query / key-value heads and MLP widths).

  Returns:
    ``vocab, context, d_model, depth, num_heads, head_dim, mlp_dim,
    num_kv_heads, tied`` (per-block ones as lists).

  Raises:
    ValueError: when the heads' widths differ between projections or blocks
      (the constructor has one ``head_dim``; a block without heads has none).
  """
  vocab, d_model = model.embed.embedding.shape
  attn = [b.attn for b in model.blocks]
  kernels = [k for a in attn for k in (a.query.kernel, a.key.kernel, a.value.kernel)]
  # a block slimmed to no heads has no head width (its kernels are empty)
  head_dims = ({k.shape[2] for k in kernels if k.size}
               | {a.out.kernel.shape[1] for a in attn if a.out.kernel.size})
  if len(head_dims) > 1:
    raise ValueError(f"Cannot describe GPT: head widths {sorted(head_dims)} differ, and its "
                     "constructor takes one head_dim.")
  return {"vocab": int(vocab), "context": int(model.pos.shape[0]), "d_model": int(d_model),
          "depth": len(attn), "num_heads": [int(a.query.kernel.shape[1]) for a in attn],
          "head_dim": int(head_dims.pop()) if head_dims else 1,
          "mlp_dim": [int(b.mlp_in.kernel.shape[1]) for b in model.blocks],
          "num_kv_heads": [int(a.key.kernel.shape[1]) for a in attn],
          "tied": model.head is None}


NNX_DESCRIBERS: dict[type, Callable[[Any], dict[str, Any]]] = {
    transformers_nnx.GPT: describe_nnx_gpt,
}


def register_nnx(cls: type, describe: Callable[[Any], dict[str, Any]]) -> None:
  """Lets :func:`save` write NNX models of class ``cls``.

  Args:
    cls: an ``nnx.Module`` class constructed as ``cls(**arguments, rngs=rngs)``.
    describe: ``model -> arguments`` (JSON data), read from the model (its
      parameter shapes), that rebuild a model of the same parameter shapes.
  """
  NNX_DESCRIBERS[cls] = describe


# ------------------------------------------------------------------------ shapes


def _key(k: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"params/block_0/...": (shape, dtype)}`` of a tree of arrays / metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in path): (tuple(int(d) for d in leaf.shape),
                                            np.dtype(leaf.dtype).name)
          for path, leaf in leaves}


def _stored(tree: Any) -> Any:
  """``tree`` with its zero-size leaves as ``None``: orbax refuses zero-size arrays, and
  a layer slimmed to width 0 has nothing to store (:func:`load` rebuilds it)."""
  return jax.tree.map(lambda x: None if not math.prod(x.shape) else x, tree)


def _rebuilt(restored: Any, target: Any) -> Any:
  """``restored`` with its ``None`` leaves (zero-size in ``target``) as zeros."""
  return jax.tree.map(lambda r, t: jnp.zeros(t.shape, t.dtype) if r is None else r,
                      restored, target, is_leaf=lambda x: x is None)


def _check_same(want: Any, got: Any, what: str) -> None:
  """``ValueError`` listing the leaves whose shape / dtype (or presence) differ; zero-size
  leaves are not compared (:func:`_stored`)."""
  a, b = _specs(_stored(want)), _specs(_stored(got))
  bad = [f"{k}: expected {a.get(k, 'nothing')}, found {b.get(k, 'nothing')}"
         for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
  if bad:
    raise ValueError(f"{what}: {len(bad)} array(s) differ: " + "; ".join(bad[:5]))


def _abstract_linen(module: nn.Module, spec: dict[str, Any]) -> Any:
  x = jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]))
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)


def _abstract_nnx(cls: type, arguments: dict[str, Any]) -> tuple[Any, Any, Any]:
  """``(graphdef, abstract params, other state)`` of ``cls(**arguments)``."""
  model = nnx.eval_shape(lambda: cls(**arguments, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param, ...)


# -------------------------------------------------------------------- save / load


def _prepare(directory: PathLike, overwrite: bool) -> pathlib.Path:
  root = pathlib.Path(directory).resolve()
  for name in (ARCHITECTURE, VARIABLES):
    if (root / name).exists():
      if not overwrite:
        raise FileExistsError(f"{root / name} exists; pass overwrite=True to replace it.")
      if name == VARIABLES:
        shutil.rmtree(root / name)
      else:
        (root / name).unlink()
  root.mkdir(parents=True, exist_ok=True)
  return root


def _describe_linen(module: nn.Module, variables: Any, sample_input: Any) -> dict[str, Any]:
  if sample_input is None:
    raise ValueError(f"save: a Linen {type(module).__name__} needs sample_input (one input "
                     "batch): init needs it to rebuild the variable shapes.")
  x = np.asarray(sample_input) if not hasattr(sample_input, "dtype") else sample_input
  spec = {"shape": [1, *(int(d) for d in x.shape[1:])], "dtype": np.dtype(x.dtype).name}
  arch = {"format": FORMAT, "framework": "linen", "class": class_path(type(module)),
          "attributes": linen_attributes(module), "input": spec}
  rebuilt = import_class(arch["class"])(**_from_json(arch["attributes"]))
  _check_same(_abstract_linen(rebuilt, spec), variables,
              f"save: {type(module).__name__} rebuilt from its attributes does not have "
              "the variables' shapes")
  return arch


def _describe_nnx(model: nnx.Module) -> dict[str, Any]:
  cls = type(model)
  if cls not in NNX_DESCRIBERS:
    raise ValueError(f"Cannot describe the NNX model {cls.__qualname__}: no describer is "
                     "registered for its class (examples.export.register_nnx).")
  arch = {"format": FORMAT, "framework": "nnx", "class": class_path(cls),
          "arguments": _to_json(NNX_DESCRIBERS[cls](model), cls.__qualname__)}
  _, params, rest = _abstract_nnx(cls, _from_json(arch["arguments"]))
  if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) or jax.tree.leaves(rest):
    raise ValueError(f"Cannot describe {cls.__qualname__}: it has state other than "
                     "nnx.Param (e.g. BatchNorm statistics), which is not saved.")
  _check_same(nnx.to_pure_dict(params), nnx.to_pure_dict(nnx.state(model, nnx.Param)),
              f"save: {cls.__qualname__} rebuilt from {arch['arguments']} does not have "
              "the model's parameter shapes")
  return arch


def save(directory: PathLike, module_or_model: Union[nn.Module, nnx.Module],
         variables: Optional[Any] = None, *, sample_input: Optional[Any] = None,
         overwrite: bool = False) -> pathlib.Path:
  """Writes ``architecture.json`` and an orbax checkpoint ``variables/``.

  The architecture is checked before anything is written: the model rebuilt
  from it must have exactly the arrays' shapes and dtypes.

  Args:
    directory: where to write (created if needed).
    module_or_model: a Linen module (with ``variables``) or an NNX model.
    variables: the Linen variables (``{"params": ..., ...}``); ``None`` for NNX.
    sample_input: Linen only: one input batch (an array; its shape after the
      batch axis and its dtype are recorded for ``init``).
    overwrite: replace an earlier export in ``directory``.

  Returns:
    The directory (absolute).

  Raises:
    ValueError: the model cannot be described (class not importable, attribute
      not JSON data, unregistered NNX class, shapes not rebuilt), or the
      arguments do not fit the framework.
    FileExistsError: ``directory`` holds an export and ``overwrite`` is False.
  """
  if isinstance(module_or_model, nn.Module):
    if variables is None:
      raise ValueError("save: a Linen module needs its variables.")
    arch = _describe_linen(module_or_model, variables, sample_input)
    arrays = variables
  elif isinstance(module_or_model, nnx.Module):
    if variables is not None or sample_input is not None:
      raise ValueError("save: an NNX model holds its arrays; pass no variables / sample_input.")
    arch = _describe_nnx(module_or_model)
    arrays = nnx.to_pure_dict(nnx.state(module_or_model, nnx.Param))
  else:
    raise ValueError(f"Cannot describe {type(module_or_model).__qualname__}: neither a Linen "
                     "nor an NNX module.")
  root = _prepare(directory, overwrite)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / VARIABLES, _stored(arrays))
    ckptr.wait_until_finished()
  tmp = root / (ARCHITECTURE + ".tmp")   # written last: its presence means a complete export
  tmp.write_text(json.dumps(arch, indent=2) + "\n", encoding="utf-8")
  os.replace(tmp, root / ARCHITECTURE)
  return root


def read_architecture(directory: PathLike) -> dict[str, Any]:
  """The parsed ``architecture.json`` of an export.

  Args:
    directory: written by :func:`save`.

  Returns:
    The JSON object (``framework``, ``class``, ``attributes`` / ``arguments``).

  Raises:
    FileNotFoundError: naming the missing file.
  """
  path = pathlib.Path(directory).resolve() / ARCHITECTURE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {directory} is not a model exported by "
                            "examples.export.save.")
  return json.loads(path.read_text(encoding="utf-8"))


def _restore(root: pathlib.Path, target: Any, what: str) -> Any:
  """The checkpoint under ``root`` restored into ``target``, shapes checked first."""
  if not (root / VARIABLES).is_dir():
    raise FileNotFoundError(f"{root / VARIABLES} not found (an incomplete export).")
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(root / VARIABLES).item_metadata.tree
    _check_same(target, stored, f"load: {what} does not match the stored arrays")
    return _rebuilt(ckptr.restore(root / VARIABLES, _stored(target)), target)


def load(directory: PathLike) -> Union[tuple[nn.Module, Any], nnx.Module]:
  """Rebuilds an exported model and restores its arrays.

  Args:
    directory: written by :func:`save`. The model's class must be importable.

  Returns:
    ``(module, variables)`` for a Linen export (attribute lists as tuples), the
    model for an NNX export.

  Raises:
    FileNotFoundError: naming a missing ``architecture.json`` / ``variables/``.
    ValueError: the class path does not import, the framework is unknown, or a
      stored array's shape / dtype differs from the rebuilt architecture's.
  """
  arch = read_architecture(directory)
  root = pathlib.Path(directory).resolve()
  cls = import_class(arch.get("class", ""))
  framework = arch.get("framework")
  if framework == "linen":
    module = cls(**_from_json(arch["attributes"]))
    target = _abstract_linen(module, arch["input"])
    return module, _restore(root, target, f"{arch['class']}{arch['attributes']}")
  if framework == "nnx":
    graphdef, params, rest = _abstract_nnx(cls, _from_json(arch["arguments"]))
    restored = _restore(root, nnx.to_pure_dict(params), f"{arch['class']}{arch['arguments']}")
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
  raise ValueError(f"{root / ARCHITECTURE}: unknown framework {framework!r} (linen or nnx).")
