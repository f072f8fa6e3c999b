r"""Runs the evidence studies on Fashion-MNIST: one command per study, resumable.

Usage::

    apt-get install dataset-fashion-mnist           # once: /usr/share/datasets/fashion-mnist
    python -m examples.study table1                 # Table 1 analogue
    python -m examples.study all --out docs/results # every study, in order
    python -m examples.study lottery --smoke --data idx:/some/dir  # a tiny version

Studies (docs/results.md has their outputs, commands and timings):

=================  ===========================================================
``table1``         Table 1: LeNet-5 and Conv-4, SplitLBI / SGD variants, Adam
``kappa_nu``       Fig. 4: W on supp Γ without fine-tuning, density, κ and ν
``lottery``        Fig. 5: early supp Γ retrained vs random and magnitude masks
``path``           Fig. 1: filter solution path of LeNet-5 (κ = 10), filters
``sensitivity``    initialisations, the largest stable rate, warm-up
``groups``         issue 17: per-leaf filter groups vs groups spanning layers
                   (ResNet-20: accuracy, FLOPs, CPU latency, matched FLOPs)
``growth``         issue 19: LeNet-5 grown from narrow vs fixed widths
``transformers``   issue 18: heads and MLP neurons of a GPT (``fortunes``,
                   ``--text``) and a ViT: baselines, path, slim models, controls
=================  ===========================================================

Each study writes ``<out>/<study>/table.md`` (tables, mean ± sd over seeds,
with timing) and PNG plots, and keeps every run under ``<out>/<study>/runs/``;
a rerun skips the runs that finished (``runs/<key>/result.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Optional

from examples.configs.fashion import DATASET
from examples.studies import common

STUDIES = ("sensitivity", "table1", "kappa_nu", "lottery", "path", "groups", "growth",
           "transformers")


def _module(name: str):
  return importlib.import_module(f"examples.studies.{name}")


def settings_of(name: str, smoke: bool, seeds: Optional[int], text: Optional[str] = None,
                variant: str = "full"):
  """The study's settings ``variant`` (``"smoke"`` when ``smoke``), with ``seeds``
  overriding its seed count and ``text`` its text corpus directory (studies with a
  ``text_dir``)."""
  table = _module(name).SETTINGS
  key = "smoke" if smoke else variant
  if key not in table:
    raise SystemExit(f"error: --settings {key!r}: study {name} has {', '.join(table)}.")
  s = table[key]
  s = dataclasses.replace(s, seeds=seeds) if seeds else s
  return dataclasses.replace(s, text_dir=text) if text and hasattr(s, "text_dir") else s


def _check_dataset(dataset: str) -> None:
  if dataset.startswith("idx:") and not os.path.isdir(os.path.expanduser(dataset[4:])):
    raise SystemExit(f"error: --data {dataset!r}: no such directory. Install Fashion-MNIST "
                     "with `apt-get install dataset-fashion-mnist` (files in "
                     f"{common.FASHION_DIR}) or pass --data idx:/dir/with/idx/files.")


def run_one(name: str, out: str, *, dataset: str = DATASET, smoke: bool = False,
            seeds: Optional[int] = None, text: Optional[str] = None, command: str = "",
            variant: str = "full") -> str:
  """Runs (or resumes) study ``name``; writes ``<out>/<name>/table.md`` (a settings
  variant other than full or smoke: ``<out>/<name>-<variant>/``); its path."""
  module, settings = _module(name), settings_of(name, smoke, seeds, text, variant)
  study_dir = os.path.join(out, name if smoke or variant == "full" else f"{name}-{variant}")
  t0 = time.time()
  results = common.run_study(module.runs(settings, dataset), os.path.join(study_dir, "runs"),
                             say=lambda line: print(f"{name} {line}", flush=True))
  body = module.report(settings, results, study_dir)
  t = common.timing(results)
  head = (f"# Study `{name}`{' (smoke)' if smoke else ''}\n\n"
          f"Command: `{command or 'python -m examples.study ' + name}`  \n"
          f"Data: `{dataset}`  \nSettings: `{settings}`  \n"
          f"Compute: {common.timing_line(t)}\n\n")
  common.write_text(os.path.join(study_dir, "timing.json"),
                    json.dumps(dict(t, invocation_wall_s=time.time() - t0), indent=1))
  return common.write_text(os.path.join(study_dir, "table.md"), head + body)


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
  parser = argparse.ArgumentParser(
      prog="python -m examples.study", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", choices=[*STUDIES, "all"], help="the study, or all of them")
  parser.add_argument("--out", default="workdirs/studies",
                      help="output directory (default workdirs/studies)")
  parser.add_argument("--data", default=DATASET,
                      help=f"dataset of every run (default {DATASET})")
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny version (one short epoch, one or two seeds) for tests")
  parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
  parser.add_argument("--settings", default="full",
                      help="a study's named settings (default full; e.g. transformers "
                           "vit_long: the dense ViT trained 10 000 steps)")
  parser.add_argument("--text", default=None,
                      help="text corpus directory of the GPT runs (default "
                           "/usr/share/games/fortunes, `apt-get install fortunes`)")
  args = parser.parse_args(argv)
  _check_dataset(args.data)
  command = "python -m examples.study " + " ".join(sys.argv[1:] if argv is None else argv)
  names = STUDIES if args.name == "all" else (args.name,)
  written = [run_one(n, args.out, dataset=args.data, smoke=args.smoke, seeds=args.seeds,
                     text=args.text, command=command, variant=args.settings) for n in names]
  for w in written:
    print(w)
  return written


if __name__ == "__main__":
  main()
