"""Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json) built from our SentencePiece model,
so ``transformers.AutoTokenizer.from_pretrained(EXPORT)`` gives our exact ids.

The SentencePiece BPE model becomes a ``tokenizers`` BPE model with the same vocabulary (same ids), the
merges SentencePiece would do (every split of a piece into two pieces, ranked by the piece's score: SP's
BPE merges the best-scoring adjacent pair, which is the lowest-ranked merge), byte fallback, the special
pieces and the user-defined ``\\n`` as added tokens, and a normalizer that only escapes spaces as ``▁``
(our trainer uses identity normalisation and no dummy prefix). No BOS/EOS is added on encode, and special
tokens written in the text ("<s>") stay plain characters, as in SentencePiece.

Caveat: a literal ``▁`` (U+2581) in the text is indistinguishable from a space for the HF tokenizer; our
:class:`tokenizer.tokenizer.Tokenizer` encodes it as its UTF-8 bytes instead. Ids agree on all other text.
"""

from __future__ import annotations

from pathlib import Path

_META = "\u2581"


def _read_model(model_file: str | Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE or norm.name != "identity" or norm.add_dummy_prefix \
            or norm.remove_extra_whitespaces:
        raise ValueError(f"{model_file}: only BPE models with identity normalisation and no dummy prefix (as "
                         "`polar tokenizer train` writes) convert to identical Hugging Face tokenizer files")
    return proto, pb.ModelProto.SentencePiece


def _merges(pieces, types) -> list[tuple[str, str]]:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = []
    for i, p in enumerate(pieces):
        if p.type != types.NORMAL or len(p.piece) < 2:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, vocab[left], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_hf_tokenizer(model_file: str | Path):
    """A ``transformers.PreTrainedTokenizerFast`` with the ids of the SentencePiece model ``model_file``."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    proto, types = _read_model(model_file)
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    spec = proto.trainer_spec
    unk = pieces[spec.unk_id].piece
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=_merges(pieces, types), unk_token=unk,
                                 byte_fallback=spec.byte_fallback, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", _META)
    tok.decoder = decoders.Sequence([decoders.Replace(_META, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Added tokens are matched before BPE, as SentencePiece matches user-defined symbols first.
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (types.CONTROL, types.UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in pieces if p.type == types.USER_DEFINED])

    def name(i: int) -> str | None:
        return pieces[i].piece if i >= 0 else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, pad_token=name(spec.pad_id), bos_token=name(spec.bos_id),
        eos_token=name(spec.eos_id), add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # SentencePiece reads "<s>" in text as plain characters, not the control id
    )


def write_hf_tokenizer_files(model_file: str | Path, out_dir: str | Path) -> None:
    """Write the Hugging Face tokenizer files for ``model_file`` into ``out_dir``."""
    build_hf_tokenizer(model_file).save_pretrained(str(out_dir))
