r"""The command line of the example trainer: picks a config, applies ``--set``
overrides, joins a multi-process job, and calls
:func:`examples.train.train_and_evaluate`.

Usage (``python -m examples.main`` is the same command)::

    python -m examples.train                      # SplitLBI on sklearn digits (~1 min)
    python -m examples.train --config digits_sgd  # the SGD (Mom-Wd) baseline
    python -m examples.train --config resnet20_cifar10 --workdir workdirs/r20 \
        --set data_dir=~/tensorflow_datasets
    python -m examples.train --list               # every named config

Several processes (one per host): the flags ``--coordinator HOST:PORT
--num_processes N --process_id I`` (or ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; or ``--multihost`` for SLURM / Cloud
TPU / GKE auto-detection) start this as one process of a job; see
docs/scaling.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Optional

from examples import configs as configs_lib
from examples import distributed, input_pipeline, train


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """The parsed command line (``--config``, ``--workdir``, ``--set``, ``--list``,
  ``--show``, ``--quiet`` and the multi-process flags)."""
  parser = argparse.ArgumentParser(
      prog="python -m examples.train",
      description=("Train a network with SplitLBI (or an optax baseline) as in Fu et al., "
                   "'Exploring Structural Sparsity of Deep Networks via Inverse Scale "
                   "Spaces'. Without arguments: SplitLBI on scikit-learn's digits (no "
                   "download, about a minute on a laptop CPU)."),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=("examples:\n"
              "  python -m examples.train                       # digits, SplitLBI\n"
              "  python -m examples.train --config digits_sgd   # SGD (Mom-Wd) baseline\n"
              "  python -m examples.train --config lenet_mnist --workdir runs/lenet \\\n"
              "      --set data_dir=~/tensorflow_datasets epochs=20\n"
              "  python -m examples.train --config lenet_mnist --set dataset=idx:~/mnist\n"
              "  python -m examples.plots runs/lenet            # PNG plots\n"
              "Datasets are never downloaded; see docs/examples.md."))
  parser.add_argument("--config", default="digits",
                      help="named config (default: digits); --list shows them all")
  parser.add_argument("--workdir", default=None,
                      help="directory for metrics, norms, checkpoints (resumes if present)")
  parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                      help="override config fields, e.g. --set epochs=3 nu=100 optimizer=sgd")
  parser.add_argument("--list", action="store_true", help="list the named configs and exit")
  parser.add_argument("--show", action="store_true", help="print the resolved config and exit")
  parser.add_argument("--quiet", action="store_true", help="only the final summary")
  distributed.add_flags(parser)
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Command-line entry point.

  Args:
    argv: the arguments (``sys.argv[1:]`` when ``None``).

  Returns:
    The final metrics (see :func:`examples.train.train_and_evaluate`); ``{}``
    for ``--list`` and ``--show``.
  """
  args = parse_args(argv)
  if args.list:
    for name, cfg in configs_lib.all_configs().items():
      print(f"{name:<38} {cfg.description}")
    return {}
  config = configs_lib.apply_overrides(configs_lib.get_config(args.config), args.set)
  if args.show:
    for f in dataclasses.fields(config):
      print(f"{f.name} = {getattr(config, f.name)!r}")
    return {}
  distributed.initialize(distributed.options_from_args(args))  # before any JAX backend use
  try:
    return train.train_and_evaluate(config, args.workdir, verbose=not args.quiet)
  except input_pipeline.DatasetNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()
