"""App. D / Fig. 7: rewind fine-tuning of the Γ_100 subnet on MNIST (LeNet-3, Conv-2, Conv-4).

1. ``rewind/<net>/search``: SplitLBI (Mom-Wd) for 100 epochs; writes supp Γ_100
   (``masks/epoch_0100.npz``) and the weights at epochs 0, 30, 60, 90, 100
   (``snapshots/epoch_XXXX.npz``).
2. ``rewind/<net>/finetune``: reload the weights of epoch k (``init_from``,
   default k = 30: "F-epoch30"; k = 0 is "SplitLBI (Lottery)") under the mask of
   Γ_100 and fine-tune with SplitLBI (Mom-Wd).
3. ``rewind/<net>/sgd_lottery``: SGD (Mom-Wd) on the same subnet from the
   epoch-0 weights ("SGD (Lottery)", Frankle & Carbin 2019).
"""

from examples.configs.base import Config

NETS = ("lenet3", "conv2", "conv4")
SNAPSHOTS = (0, 30, 60, 90, 100)


def get_configs() -> dict[str, Config]:
  out = {}
  for net in NETS:
    search = Config(
        name=f"rewind/{net}/search", description=f"App. D: SplitLBI (Mom-Wd) on MNIST, {net}",
        dataset="mnist", model=net, optimizer="splitlbi", learning_rate=0.1, kappa=1.0,
        nu=10.0, momentum=0.9, weight_decay=1e-4, batch_size=128, epochs=100, schedule="step",
        decay_every=30, save_masks_at=(100,), save_params_at=SNAPSHOTS, eval_batch_size=1000)
    out[search.name] = search
    src = f"workdirs/rewind_{net}"
    out[f"rewind/{net}/finetune"] = search.replace(
        name=f"rewind/{net}/finetune",
        description=f"App. D: F-epoch30 fine-tuning of the Γ_100 subnet of {net}",
        epochs=40, save_masks_at=(), save_params_at=(),
        mask_from=f"{src}/masks/epoch_0100.npz", init_from=f"{src}/snapshots/epoch_0030.npz")
    out[f"rewind/{net}/sgd_lottery"] = out[f"rewind/{net}/finetune"].replace(
        name=f"rewind/{net}/sgd_lottery",
        description=f"App. D: SGD (Lottery) on the Γ_100 subnet of {net} from the init",
        optimizer="sgd", epochs=100, init_from=f"{src}/snapshots/epoch_0000.npz")
  return out
