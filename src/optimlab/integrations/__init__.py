"""optimlab inside the trainers people already use.

* `optimlab.integrations.huggingface`: `SAMTrainer` / `SAMTrainerMixin` for the Hugging Face
  ``Trainer`` (SAM's two passes over every micro-batch of an update); every other optimlab
  optimizer needs nothing there but ``Trainer(optimizers=(optimizer, scheduler))`` or
  ``optimizer_cls_and_kwargs``.

Each module imports its trainer library; install them with ``pip install optimlab[hf]``.
"""
