"""Named configs of the paper's runs: ``get_config(name)``, ``names()``.

=============================  ================================================
name                            run
=============================  ================================================
``digits`` (default)            SplitLBI on sklearn digits, ~1 min on a CPU
``digits_sgd``                  SGD (Mom-Wd) baseline on digits
``lenet_mnist[/variant]``       Table 1, MNIST / LeNet-5
``resnet20_cifar10[/variant]``  Table 1, CIFAR-10 / ResNet-20
``resnet18_imagenet[/variant]`` Table 1, ImageNet / ResNet-18
``ablation_kappa/<m>/kappaK``   Tables 2-3 (m = vgg16, resnet56; K = 1,2,5,10)
``ablation_nu/<m>/nuN``         Tables 4-5 (N = 10 ... 2000)
``lottery/<net>/search|retrain`` Fig. 5 (net = vgg16, resnet56, vgg16_lasso,
                                resnet50_lasso)
``rewind/<net>/search|finetune|sgd_lottery``  App. D (net = lenet3, conv2, conv4)
``fashion/<model>/<variant>``   study 1 on Fashion-MNIST IDX files (model = lenet5,
                                conv4; python -m examples.study, docs/results.md)
=============================  ================================================

Table 1 variants: splitlbi_naive, splitlbi_mom, splitlbi_mom_wd (the plain
name), splitlbi_nesterov, sgd_naive, sgd_mom, sgd_mom_wd, sgd_nesterov, adam.
"""

from examples.configs import ablations, digits, fashion, lottery, rewind, table1
from examples.configs.base import Config, apply_overrides

_MODULES = (digits, table1, ablations, lottery, rewind, fashion)


def all_configs() -> dict[str, Config]:
  out: dict[str, Config] = {}
  for m in _MODULES:
    out.update(m.get_configs())
  return out


def names() -> list[str]:
  return list(all_configs())


def get_config(name: str) -> Config:
  """The config called ``name`` (see the module docstring)."""
  configs = all_configs()
  if name not in configs:
    close = [n for n in configs if name in n][:10]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown config {name!r}.{hint} List them with --list.")
  return configs[name]


__all__ = ["Config", "all_configs", "apply_overrides", "get_config", "names"]
