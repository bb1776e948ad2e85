"""Tokenizers for LEGO: byte-level BPE trained on a corpus, raw bytes, a pretrained one, or a local file.

All are the same `Tokenizer` class around a Hugging Face `tokenizers.Tokenizer`, so
they share one fast batch encoder and one file format: `Tokenizer.save(run_dir)` writes
`tokenizer.json`, and `load_tokenizer(run_dir)` reads it back to decode a checkpoint.

    from lego.tokenizer import train_bpe
    tok = train_bpe(iter(["some text", "more text"]), vocab_size=512)
    tok.decode(tok.encode("some text"))  # 'some text'
    gpt2 = tokenizer_from_file("gpt2/")   # GPT-2's tokenizer.json, or its vocab.json + merges.txt
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

FILENAME = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator (id 50256 there); lego-prepare adds it where absent


class Tokenizer:
    """Text <-> token ids. Ids are in [0, vocab_size); encode adds no special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, *, ids_are_bytes: bool = False):
        self.backend = backend
        # byte_tokenizer(): id == UTF-8 byte value, so encoding is `text.encode()` (the Rust
        # backend takes ~9 s for Shakespeare's 4.3 MB on two busy cores; this, 0.15 s)
        self.ids_are_bytes = ids_are_bytes

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """Like `encode` on each text, run in parallel by the Rust backend."""
        if self.ids_are_bytes:
            return [list(text.encode("utf-8")) for text in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Union[str, Path]) -> Path:
        """Write `directory/tokenizer.json`; returns its path."""
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path


def load_tokenizer(directory: Union[str, Path]) -> Tokenizer:
    """Read what `Tokenizer.save(directory)` wrote."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no {FILENAME} in {directory}")
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))


def _byte_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable characters,
    the alphabet that `tokenizers`' ByteLevel pre-tokenizer emits."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_tokenizer() -> Tokenizer:
    """Raw UTF-8 bytes: vocabulary 256, token id == byte value."""
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    return Tokenizer(_byte_level(models.BPE(vocab=vocab, merges=[])), ids_are_bytes=True)


def train_bpe(texts: Iterator[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """Byte-level BPE with `vocab_size` tokens learned from `texts` (no special tokens).
    Every byte is in the vocabulary, so any text encodes without unknown tokens."""
    backend = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(backend)


def pretrained_tokenizer(name: str) -> Tokenizer:
    """A tokenizer from the Hugging Face hub by name, e.g. 'gpt2' (needs the network
    the first time; later the hub cache serves it)."""
    return Tokenizer(tokenizers.Tokenizer.from_pretrained(name))


def tokenizer_from_file(spec: str) -> Tokenizer:
    """`bytes` (`byte_tokenizer`), or a tokenizer from local files, no network: a `tokenizer.json` (GPT-2's from
    the Hugging Face hub, or one `Tokenizer.save` wrote), or a directory holding one, or holding GPT-2's
    `vocab.json` + `merges.txt` (read as byte-level BPE, GPT-2's pre-tokenizer). ValueError says what is wrong."""
    if spec == "bytes":
        return byte_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file() and not (path / FILENAME).is_file():
            try:
                model = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
            except Exception as e:  # the Rust reader's own error type
                raise ValueError(f"{spec}: vocab.json + merges.txt do not load ({str(e).splitlines()[0]})") from None
            return Tokenizer(_byte_level(model))
        if not (path / FILENAME).is_file():
            raise ValueError(f"{spec} holds neither {FILENAME} nor vocab.json + merges.txt")
        path = path / FILENAME
    if not path.is_file():
        raise ValueError(f"no such file or directory {spec!r}")
    try:
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as e:
        raise ValueError(f"{spec} is not a tokenizers JSON file ({str(e).splitlines()[0]})") from None


def end_of_text_id(tok: Tokenizer, token: str = END_OF_TEXT) -> int:
    """The id of `token` in `tok`; where the vocabulary lacks it, it is added as a special token, taking the
    next id (byte_tokenizer: 256, so the vocabulary grows to 257)."""
    eot = tok.backend.token_to_id(token)
    if eot is None:
        tok.backend.add_special_tokens([tokenizers.AddedToken(token, special=True)])
        eot = tok.backend.token_to_id(token)
    return eot
