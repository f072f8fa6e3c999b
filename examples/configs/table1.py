"""Table 1: every optimizer variant on MNIST/LeNet-5, CIFAR-10/ResNet-20, ImageNet/ResNet-18.

Paper Sec. 4.1: 100 epochs, learning rate 0.1 (Adam 0.001) ×0.1 every 30
epochs, batch 128 (ImageNet 256); SplitLBI κ = 1, λ = 1, ν = 10 (ImageNet
1000); momentum 0.9; weight decay 1e-4 for the "-Wd" rows.
"""

from examples.configs.base import Config

VARIANTS = {
    "splitlbi_naive": dict(optimizer="splitlbi", momentum=0.0),
    "splitlbi_mom": dict(optimizer="splitlbi", momentum=0.9),
    "splitlbi_mom_wd": dict(optimizer="splitlbi", momentum=0.9, weight_decay=1e-4),
    "splitlbi_nesterov": dict(optimizer="splitlbi", momentum=0.9, nesterov=True),
    "sgd_naive": dict(optimizer="sgd", momentum=0.0),
    "sgd_mom": dict(optimizer="sgd", momentum=0.9),
    "sgd_mom_wd": dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4),
    "sgd_nesterov": dict(optimizer="sgd", momentum=0.9, nesterov=True),
    "adam": dict(optimizer="adam", learning_rate=1e-3),
}

BASES = {
    "lenet_mnist": Config(
        name="lenet_mnist", description="Table 1, MNIST: LeNet-5",
        dataset="mnist", model="lenet5", nu=10.0, batch_size=128, epochs=100,
        schedule="step", decay_every=30, eval_batch_size=1000),
    "resnet20_cifar10": Config(
        name="resnet20_cifar10", description="Table 1, CIFAR-10: ResNet-20",
        dataset="cifar10", model="resnet20", nu=10.0, batch_size=128, epochs=100,
        schedule="step", decay_every=30, eval_batch_size=1000),
    "resnet18_imagenet": Config(
        name="resnet18_imagenet", description="Table 1, ImageNet-2012: ResNet-18",
        dataset="imagenet2012", model="resnet18", image_size=224, nu=1000.0,
        batch_size=256, epochs=100, schedule="step", decay_every=30, eval_batch_size=250),
}

# The plain names run the best SplitLBI row (Mom-Wd).
DEFAULT_VARIANT = "splitlbi_mom_wd"


def get_configs() -> dict[str, Config]:
  out = {}
  for base_name, base in BASES.items():
    for variant, kw in VARIANTS.items():
      name = f"{base_name}/{variant}"
      out[name] = base.replace(name=name, description=f"{base.description}, {variant}", **kw)
    out[base_name] = out[f"{base_name}/{DEFAULT_VARIANT}"].replace(name=base_name)
  return out
