"""Corpus statistics: tokens per split, vocabulary size, and the unigram perplexity of the
test split (add-one smoothed counts from the training split), the baseline any trained
language model on the same tokenization must beat. Bits per byte compare tokenizers.

    python scripts/corpus_stats.py                                   # shakespeare, BPE 2048
    python scripts/corpus_stats.py --data kjv --tokenizer bytes
    python scripts/corpus_stats.py --data text_files 'train_files=[a.txt]' \
        'train_split=train[:90%]' 'validation_split=train[90%:95%]' 'test_split=train[95%:]'

--data picks conf/data/<name>.yaml; trailing key=value pairs set any other DataConfig field.
"""
import argparse
import logging
import math
import time
from pathlib import Path

from omegaconf import OmegaConf

from lego.config import SPLITS, DataConfig
from lego.data import load_corpus, unigram_perplexity

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def parse_config(argv=None) -> DataConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shakespeare", choices=sorted(f.stem for f in CONF.glob("*.yaml")))
    p.add_argument("--tokenizer", choices=["bpe", "bytes", "pretrained"])
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--pretrained-name")
    p.add_argument("--cache-dir")
    p.add_argument("overrides", nargs="*", help="DataConfig fields as key=value")
    args = p.parse_args(argv)
    flags = {"tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
             "pretrained_name": args.pretrained_name, "cache_dir": args.cache_dir}
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / f"{args.data}.yaml"),
                          {k: v for k, v in flags.items() if v is not None},
                          OmegaConf.from_dotlist(args.overrides))
    return OmegaConf.to_object(cfg)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(argv)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg)
    seconds = time.perf_counter() - t0

    print(f"data={cfg.name} tokenizer={cfg.tokenizer} vocab_size={corpus.vocab_size} "
          f"cache_key={corpus.cache_key[:16]} (loaded in {seconds:.1f}s)")
    print(f"{'split':<12}{'tokens':>12}{'text bytes':>14}{'bytes/token':>13}{'unigram ppl':>13}{'bits/byte':>11}")
    for split in SPLITS:
        tokens, n_bytes = getattr(corpus, split), corpus.text_bytes[split]
        ppl = unigram_perplexity(corpus.train, tokens, corpus.vocab_size)
        bits_per_byte = len(tokens) * math.log2(ppl) / n_bytes  # same total code length, per byte
        print(f"{split:<12}{len(tokens):>12,}{n_bytes:>14,}{n_bytes / len(tokens):>13.2f}"
              f"{ppl:>13.1f}{bits_per_byte:>11.3f}")
    print("unigram ppl: add-one smoothed token frequencies of the train split; the test row is "
          "the baseline a model must beat.")


if __name__ == "__main__":
    main()
