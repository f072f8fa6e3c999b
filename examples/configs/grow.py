"""Growth runs (``python -m examples.grow --config NAME``; issue 19, docs/growing.md).

Each entry is ``(Config, Growth)``: the narrow start network and SplitLBI
settings, and the growth schedule (the official rule F → max(F + 4, ⌊1.1 F⌋),
τ = 0.8, shortened rounds). ``*_full`` / fixed-width baselines are trained by
the study with the same epochs (``examples/studies/growth.py``).

=========================  ==========================================================
``grow/digits``            digits CNN from 4, 4 filters and 8 hidden units, 1 min CPU
``grow/fashion_lenet5``    LeNet-5 on Fashion-MNIST from 4, 4 filters, 8, 8 units
``grow/fashion_resnet20``  ResNet-20 (BatchNorm, residual stages grow as one class) on
                           Fashion-MNIST padded 32×32×3, from 4 channels per stage
=========================  ==========================================================
"""

from examples.configs.base import Config
from examples.configs.digits import DIGITS
from examples.configs.fashion import DATASET
from examples.grow import Growth

GROWTH = {
    "grow/digits": (
        DIGITS.replace(name="grow/digits", model_kwargs=(("features", (4, 4)), ("hidden", (8,))),
                       epochs=0, slim=False, schedule="constant"),
        Growth(round_epochs=3, final_epochs=10, max_rounds=10)),
    "grow/fashion_lenet5": (
        Config(name="grow/fashion_lenet5", dataset=DATASET, model="lenet5",
               model_kwargs=(("features", (4, 4)), ("hidden", (8, 8))), optimizer="splitlbi",
               learning_rate=0.1, kappa=1.0, nu=10.0, lam=1.0, momentum=0.9,
               weight_decay=1e-4, batch_size=128, schedule="constant", warmup_steps=100,
               epochs=0),
        Growth(round_epochs=2, final_epochs=6, max_rounds=12)),
    "grow/fashion_resnet20": (
        Config(name="grow/fashion_resnet20", dataset=DATASET, model="resnet20",
               model_kwargs=(("width", 4),), optimizer="splitlbi", learning_rate=0.1, kappa=1.0,
               nu=10.0, lam=1.0, momentum=0.9, weight_decay=1e-4, batch_size=128,
               schedule="constant", warmup_steps=100, epochs=0),
        Growth(round_epochs=2, final_epochs=6, max_rounds=12)),
}
