"""Fashion-MNIST runs of the evidence studies (``python -m examples.study``).

The data are Debian's ``dataset-fashion-mnist`` IDX files
(``apt-get install dataset-fashion-mnist`` → ``/usr/share/datasets/fashion-mnist``),
normalised with their own training split's mean / std (0.2860 / 0.3530).

``fashion/<model>/<variant>`` (model ``lenet5`` or ``conv4``, variant as in
Table 1: ``splitlbi_naive`` ... ``adam``) is one seed of study 1 at the size it
is run there: the paper's hyperparameters (lr 0.1, Adam 1e-3, momentum 0.9,
wd 1e-4 for "-Wd", κ = 1, ν = 10, λ = 1, batch 128) with a linear warm-up over
the first ``WARMUP_STEPS`` steps (without it lr 0.1 / momentum 0.9 kills some
seeds of both SGD and SplitLBI here, see docs/results.md), and a budget cut to
fit 2 CPU cores: LeNet-5 5 epochs on all 60 000 images (×0.1 after epoch 4),
Conv-4 2 epochs on the first 4 096 images (test on the first 2 000).
"""

from examples.configs.base import Config
from examples.configs.table1 import VARIANTS

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASET = f"idx:{FASHION_DIR}"
WARMUP_STEPS = 100

# The paper's Table 1 hyperparameters (Sec. 4.1), Mom-Wd.
PAPER = dict(optimizer="splitlbi", learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
             kappa=1.0, nu=10.0, lam=1.0, batch_size=128)

SIZES = {
    "lenet5": dict(epochs=5, schedule="multistep", milestones=(4,), eval_batch_size=1000),
    "conv4": dict(epochs=2, schedule="constant", train_examples=4096, eval_examples=2000,
                  eval_batch_size=500),
}


def base(model: str, dataset: str = DATASET) -> Config:
  """The paper's Mom-Wd SplitLBI on Fashion-MNIST at the study size of ``model``."""
  return Config(name=f"fashion/{model}", description=f"Fashion-MNIST, {model}",
                dataset=dataset, model=model, warmup_steps=WARMUP_STEPS, progress=False,
                **PAPER, **SIZES[model])


def get_configs() -> dict[str, Config]:
  out = {}
  for model in SIZES:
    for variant, kw in VARIANTS.items():
      name = f"fashion/{model}/{variant}"
      out[name] = base(model).replace(name=name, description=f"Fashion-MNIST, {model}, "
                                      f"{variant} (study 1)", **kw)
  return out
