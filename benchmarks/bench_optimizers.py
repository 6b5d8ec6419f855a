"""Time every optimlab optimizer against torch.optim (and transformers' Adafactor).

The same code as ``optimlab bench``; see `optimlab.bench` for the method.  The README's
performance table comes from

    python benchmarks/bench_optimizers.py --suite all --repeat 10

(``--suite gpt2|small|all``, ``--optimizers adamw adam sgd adagrad rmsprop radam adafactor``,
``--json PATH`` to keep the rows).
"""

import sys

from optimlab.bench import main

if __name__ == "__main__":
    sys.exit(main())
