"""Fashion-MNIST runs of the evidence studies (``python -m examples.study``).

The data are Debian's ``dataset-fashion-mnist`` IDX files
(``apt-get install dataset-fashion-mnist`` → ``/usr/share/datasets/fashion-mnist``),
normalised with their own training split's mean / std (0.2860 / 0.3530).

``fashion/<model>/<variant>`` (model ``lenet5`` or ``conv4``, variant as in
Table 1: ``splitlbi_naive`` ... ``adam``) is one seed of study 1 at the size it
is run there: the paper's hyperparameters (lr 0.1, Adam 1e-3, momentum 0.9,
wd 1e-4 for "-Wd", κ = 1, ν = 10, λ = 1, batch 128) with a linear warm-up
(without it lr 0.1 / momentum 0.9 kills some seeds of both SGD and SplitLBI
here, see docs/results.md), cut to fit 2 CPU cores:

- LeNet-5: 5 epochs on all 60 000 images, ×0.1 after epoch 4, warm-up 100 steps.
- Conv-4: one epoch on the first 6 144 images (test on the first 2 000), batch
  32 and lr 0.01 (Adam 1e-3), warm-up 50 steps: at batch 128 Conv-4's loss
  spikes and often collapses at lr 0.1, 0.05 and even 0.025, warm-up or not.
"""

from examples.configs.base import Config
from examples.configs.table1 import VARIANTS

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASET = f"idx:{FASHION_DIR}"
WARMUP_STEPS = 100  # LeNet-5 (Conv-4: 50)

# The paper's Table 1 hyperparameters (Sec. 4.1), Mom-Wd.
PAPER = dict(optimizer="splitlbi", learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
             kappa=1.0, nu=10.0, lam=1.0, batch_size=128)

SIZES = {
    "lenet5": dict(epochs=5, schedule="multistep", milestones=(4,), eval_batch_size=1000,
                   warmup_steps=WARMUP_STEPS),
    "conv4": dict(epochs=1, schedule="constant", train_examples=6144, eval_examples=2000,
                  eval_batch_size=500, batch_size=32, learning_rate=0.01, warmup_steps=50),
}


def base(model: str, dataset: str = DATASET) -> Config:
  """The paper's Mom-Wd SplitLBI on Fashion-MNIST at the study size of ``model``."""
  return Config(name=f"fashion/{model}", description=f"Fashion-MNIST, {model}",
                dataset=dataset, model=model, progress=False, **{**PAPER, **SIZES[model]})


def variant(model: str, name: str, dataset: str = DATASET) -> Config:
  """``base(model)`` as Table 1's ``name`` variant (weight decay only in "-Wd")."""
  return base(model, dataset).replace(**{"weight_decay": 0.0, **VARIANTS[name]})


def get_configs() -> dict[str, Config]:
  out = {}
  for model in SIZES:
    for v in VARIANTS:
      name = f"fashion/{model}/{v}"
      out[name] = variant(model, v).replace(
          name=name, description=f"Fashion-MNIST, {model}, {v} (study 1)")
  return out
