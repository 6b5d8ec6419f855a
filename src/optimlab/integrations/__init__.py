"""optimlab inside the trainers people already use.

* `optimlab.integrations.huggingface`: `SAMTrainer` / `SAMTrainerMixin` for the Hugging Face
  ``Trainer`` (SAM's two passes over every micro-batch of an update); every other optimlab
  optimizer needs nothing there but ``Trainer(optimizers=(optimizer, scheduler))`` or
  ``optimizer_cls_and_kwargs``.
* accelerate needs no module: optimlab optimizers go through ``accelerator.prepare``, and
  `optimlab.accumulate_and_step` finds a SAM inside accelerate's wrapper.
* `optimlab.integrations.lightning`: `SAMLightningMixin`, SAM with micro-batches under
  Lightning's manual optimization.

Each module imports its trainer library: ``pip install optimlab[hf]`` or ``[lightning]``
(with torch pinned on the same command line).
"""
