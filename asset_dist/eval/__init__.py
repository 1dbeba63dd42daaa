"""Evaluation (`asset-dist evaluate`): tokenizers, transformers under several attention settings, edit outputs."""
