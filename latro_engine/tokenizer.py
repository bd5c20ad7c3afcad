"""Character-level tokenizer for the synthetic task, usable through the transformers API.

The vocabulary comes from a sentencepiece ``model_type="char"`` model trained in memory on
the task's texts (deterministic: single thread, identity normalisation, no dummy prefix).
At run time the same piece table is served by a ``tokenizers`` pipeline wrapped in
``PreTrainedTokenizerFast``, rather than by sentencepiece itself, because sentencepiece's
whitespace conventions (a "▁" dummy prefix, stripping the leading space on decode) would
break ``encode(decode(ids)) == ids`` for texts that start with a space, and the LaTRO
engine splices " 3+4=7." and " The answer is 9." onto prompts.  Here every character is
one token, a space is the piece "▁", and decoding just maps "▁" back to " ".

Like Llama tokenizers, ``tok(text)`` prepends BOS (pass ``add_special_tokens=False`` for
continuations) and does not append EOS; ids of sentencepiece and of the wrapper coincide.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPACE_PIECE = "\u2581"  # sentencepiece's "▁"


def train_sentencepiece_chars(texts: Iterable[str]) -> spm.SentencePieceProcessor:
    """Train a sentencepiece char model in memory; ids 0-3 are unk, bos, eos, pad."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buf,
        model_type="char",
        vocab_size=512,
        hard_vocab_limit=False,  # a char model keeps exactly the characters it saw
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def wrap_sentencepiece(sp: spm.SentencePieceProcessor) -> PreTrainedTokenizerFast:
    """Serve ``sp``'s piece table as a fast transformers tokenizer (one token per char)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Replace(" ", SPACE_PIECE)
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.Fuse()])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",  # generation batches are left-padded
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    return tok


def train_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train the char vocabulary on ``texts`` and return the wrapped tokenizer."""
    sp = train_sentencepiece_chars(texts)
    tok = wrap_sentencepiece(sp)
    logger.info("char tokenizer: %d tokens", len(tok))
    return tok
