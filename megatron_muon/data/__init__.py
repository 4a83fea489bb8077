"""The embedded corpus -> sentencepiece tokenizer -> Megatron indexed dataset pipeline (`corpus.py`);
`python -m megatron_muon.data` builds it alone."""
