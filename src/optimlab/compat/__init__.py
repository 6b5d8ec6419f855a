"""Constructors that take a reference implementation's own keyword arguments and return an
optimlab optimizer configured to reproduce it, so switching is one import:

* `optimlab.compat.torch`: torch.optim's SGD, Adagrad, RMSprop, Adam, AdamW, RAdam, Adafactor
* `optimlab.compat.hf`: transformers' Adafactor
* `optimlab.compat.composer`: MosaicML Composer's DecoupledAdamW and DecoupledSGDW
* `optimlab.compat.cs224n`: the CS224N default project's AdamW

Implementation-selection flags of the references (``foreach``, ``fused``) are accepted and
ignored: optimlab picks its implementation itself.  Flags optimlab does not implement
(``capturable=True``, ``differentiable=True``) raise ValueError.
"""

from . import composer, cs224n, hf, torch  # noqa: F401
