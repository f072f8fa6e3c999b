"""Tables 2-5 / Fig. 6: κ and ν ablations of SplitLBI on CIFAR-10 (VGG-16-BN, ResNet-56).

160 epochs, α·κ = 0.1 decayed ×0.1 at epochs 80 and 120, batch 128, momentum
0.9, weight decay 1e-4. κ ∈ {1, 2, 5, 10} at ν = 100 (α = 0.1/κ);
ν ∈ {10, 20, 50, 100, 200, 500, 1000, 2000} at κ = 1. Each run reports the
dense model W and the sparse model W on supp Γ every epoch.
"""

from examples.configs.base import Config

KAPPAS = (1, 2, 5, 10)
NUS = (10, 20, 50, 100, 200, 500, 1000, 2000)
MODELS = ("vgg16", "resnet56")


def _base(model: str) -> Config:
  return Config(
      dataset="cifar10", model=model, optimizer="splitlbi", momentum=0.9,
      weight_decay=1e-4, batch_size=128, epochs=160, schedule="multistep",
      milestones=(80, 120), eval_batch_size=1000)


def get_configs() -> dict[str, Config]:
  out = {}
  for model in MODELS:
    for k in KAPPAS:
      name = f"ablation_kappa/{model}/kappa{k}"
      out[name] = _base(model).replace(
          name=name, description=f"Table 2/3: {model}, κ={k}, ν=100, κα=0.1",
          kappa=float(k), nu=100.0, learning_rate=0.1 / k)
    for nu in NUS:
      name = f"ablation_nu/{model}/nu{nu}"
      out[name] = _base(model).replace(
          name=name, description=f"Table 4/5: {model}, ν={nu}, κ=1",
          kappa=1.0, nu=float(nu), learning_rate=0.1)
  return out
