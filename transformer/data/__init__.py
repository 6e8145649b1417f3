"""The data layer: tokenizers, corpora, token shards and the batches of both tasks.

Imports only `transformer.errors` and `transformer.files`; nothing here knows about models or
training.

  config       DataConfig, the `data` section of a run config
  tokenizer    character, byte-level BPE, GPT-2's and a pretrained model's tokenizer.json
  bundled      the corpora that install from the package index (Shakespeare, Bible pairs)
  documents    the user's files streamed as units of work
  corpora      what data.corpus names, as a Corpus
  shards       language-model corpora tokenised into memory-mapped shards
  token_cache  translation pairs tokenised once
  batching     each process's rows of a global batch, shuffled epochs, iterators
  pairs        translation rows, one pair each or packed
  pipeline     prepare_corpus and make_data: the tokenizer and batches of a run
"""
