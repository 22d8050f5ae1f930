"""Locally trained byte-level BPE tokenizers for the models we build ourselves.

Real VL-MoE checkpoints ship byte-level BPE tokenizers; ours are the same kind (trained with `tokenizers` on a
small corpus), so other runtimes' converters accept our models too. The family decides the special tokens and
the chat template; this module only trains and wraps.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..families.base import Family

_BASE_CORPUS = [
    "Describe the image.", "What is in the picture?", "What color is the circle?", "How many shapes are there?",
    "Is there a red square?", "yes", "no", "left", "right", "above", "below", "red", "green", "blue", "yellow",
    "purple", "orange", "black", "gray", "white", "circle", "square", "triangle", "rectangle", "star", "cross",
    "one", "two", "three", "four", "five", "The quick brown fox jumps over the lazy dog.",
    "What word is written in the image?", "What shape is the blue object?", "Is the red square left or right?",
]


def build_tokenizer(family: Family, corpus: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    t = family.tokens
    specials = list(dict.fromkeys(s for s in [t.pad, *t.eos, t.image, t.image_start, t.image_end, *t.extra] if s))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = list(corpus or []) + _BASE_CORPUS
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=t.eos[0], pad_token=t.pad,
                                   additional_special_tokens=[s for s in specials if s not in (t.eos[0], t.pad)])
    fast.chat_template = family.chat_template()
    fast.padding_side = "left"
    return fast
