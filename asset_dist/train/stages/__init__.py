"""Stages: what one training step computes for each of the four models (tokenizer, seg, guide, SGA)."""
