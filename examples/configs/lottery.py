"""Fig. 5 / Table 10: early-stopped supp Γ as winning tickets, retrained from the init.

Two runs per network:

1. ``lottery/<net>/search``: SplitLBI (Nesterov, wd 1e-4, batch 64, 200 epochs as
   the official scripts; α ×0.1 at 80 and 120, the paper's CIFAR schedule) writing the
   support masks at log-spaced epochs (``<workdir>/masks/epoch_XXXX.npz``) and
   the initial weights (``<workdir>/snapshots/epoch_0000.npz``).
2. ``lottery/<net>/retrain``: SGD (lr 0.1, momentum 0.9, wd 1e-4, 160 epochs,
   ×0.1 at 80 and 120) of the masked subnet from the same initialisation.
   Point ``mask_from`` / ``init_from`` at the search run's files, e.g.
   ``--set mask_from=workdirs/lottery_resnet56/masks/epoch_0020.npz``.
3. ``lottery/<net>/retrain_slim``: the same SGD run on the *slim architecture*
   of that mask (pruned channels physically removed, docs/slimming.md), trained
   from a fresh random initialisation.

Penalties (Table 10): VGG-16 / ResNet-56 group lasso (λ 0.1 / 0.05 on conv
filters, thresholds λ·√d as in the official lottery code; λ 1 on the
classifier), VGG-16 / ResNet-50 lasso (ν 500 / 200, λ 0.05 / 0.03). The
official scripts swap some of these values (official_code_facts.md); the
paper's Table 10 is used here.
"""

from examples.configs.base import Config

MASK_EPOCHS = (5, 10, 20, 40, 80, 160)

NETS = {
    "vgg16": dict(model="vgg16", penalty="group", nu=100.0, conv_lam=0.1, fc_lam=1.0,
                  normalized=True),
    "resnet56": dict(model="resnet56", penalty="group", nu=100.0, conv_lam=0.05, fc_lam=1.0,
                     normalized=True),
    "vgg16_lasso": dict(model="vgg16", penalty="lasso", nu=500.0, lam=0.05),
    "resnet50_lasso": dict(model="resnet50", model_kwargs=(("small_inputs", True),),
                           penalty="lasso", nu=200.0, lam=0.03),
}


def get_configs() -> dict[str, Config]:
  out = {}
  for net, kw in NETS.items():
    search = Config(
        name=f"lottery/{net}/search", description=f"Fig. 5: SplitLBI search, {net}",
        dataset="cifar10", optimizer="splitlbi", learning_rate=0.1, kappa=1.0, momentum=0.9,
        nesterov=True, weight_decay=1e-4, batch_size=64, epochs=200, schedule="multistep",
        milestones=(80, 120), save_masks_at=MASK_EPOCHS, save_params_at=(0,),
        eval_batch_size=1000, **kw)
    out[search.name] = search
    src = f"workdirs/lottery_{net}"
    out[f"lottery/{net}/retrain"] = search.replace(
        name=f"lottery/{net}/retrain",
        description=f"Fig. 5: retrain the Γ-subnet of {net} from its init with SGD",
        optimizer="sgd", nesterov=False, epochs=160, save_masks_at=(), save_params_at=(),
        mask_from=f"{src}/masks/epoch_0020.npz", init_from=f"{src}/snapshots/epoch_0000.npz")
    out[f"lottery/{net}/retrain_slim"] = out[f"lottery/{net}/retrain"].replace(
        name=f"lottery/{net}/retrain_slim",
        description=f"retrain the slim architecture of the {net} Γ-subnet from scratch",
        retrain_slim=True, init_from=None)
  return out
