"""optimlab: PyTorch optimizers written from the papers, each proven against a reference.

Every optimizer is a ``torch.optim.Optimizer`` subclass; see each class's docstring for its
update rule in the paper's symbols and every departure from the paper.
"""

from ._common import EPS_PLACEMENTS, WD_FORMS, WD_MODES
from ._optimizer import Optimizer
from .adafactor import Adafactor
from .adagrad import AdaGrad
from .adam import Adam, AdamW, AMSGrad
from .radam import RAdam
from .rmsprop import RMSProp
from .sam import SAM, accumulate_and_step
from .sgd import SGD
from .registry import (REGISTRY, OptimizerSpec, create_optimizer, list_optimizers,
                       param_groups_weight_decay)
from .wd_convert import convert_weight_decay
from .wd_scheduler import LambdaWD, WeightDecayScheduler, wd_schedule

__version__ = "0.1.0"

__all__ = [
    "Optimizer", "WD_MODES", "WD_FORMS", "EPS_PLACEMENTS",
    "Adam", "AdamW", "AMSGrad",
    "Adafactor",
    "SGD", "AdaGrad", "RMSProp", "RAdam",
    "SAM", "accumulate_and_step",
    "WeightDecayScheduler", "LambdaWD", "wd_schedule", "convert_weight_decay",
    "REGISTRY", "OptimizerSpec", "create_optimizer", "list_optimizers", "param_groups_weight_decay",
]
