"""The default run: a small CNN on scikit-learn's 8×8 digits (no download, ~1 min on CPU).

``digits`` trains with SplitLBI (Mom-Wd); ``digits_sgd`` is the SGD (Mom-Wd)
baseline with the same model, data, epochs and schedule. ``digits`` ends by
slimming the network (``slim=True``, docs/slimming.md). Paper settings (κ = 1,
ν = 10, κα = 0.1, momentum 0.9, wd 1e-4) except λ = 0.5 (λ = 1 leaves the tiny
model's classifier too sparse after 80 epochs) and batch 64 (SGD at lr 0.1
diverges on this network with batch 32).
"""

from examples.configs.base import Config

DIGITS = Config(
    name="digits",
    description="SplitLBI (Mom-Wd) on sklearn digits, small CNN (embedded default)",
    dataset="digits", model="digits_cnn", optimizer="splitlbi",
    learning_rate=0.1, kappa=1.0, nu=10.0, lam=0.5, momentum=0.9, weight_decay=1e-4,
    batch_size=64, eval_batch_size=360, epochs=80, schedule="step", decay_every=60, slim=True)


def get_configs() -> dict[str, Config]:
  return {
      "digits": DIGITS,
      "digits_sgd": DIGITS.replace(
          name="digits_sgd", description="SGD (Mom-Wd) baseline on sklearn digits",
          optimizer="sgd", slim=False),
  }
