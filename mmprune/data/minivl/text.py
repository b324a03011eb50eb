"""The MiniVL tokenizer: a real HF tokenizer (word level, closed vocabulary) saved with each model."""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mmprune.data.minivl.language import vocabulary

SPECIALS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")


def build_tokenizer(max_length: int = 32) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word MiniVL can produce; ids are stable across runs."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]", pair="[SOS] $A [EOS] $B [EOS]",
        special_tokens=[("[SOS]", vocab["[SOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[SOS]", eos_token="[EOS]", model_max_length=max_length)
