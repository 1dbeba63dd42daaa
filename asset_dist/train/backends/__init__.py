"""Training backends: who wraps the networks, runs backward and the optimizer, and saves them.

base.py is the interface; deepspeed.py and fsdp2.py are the two implementations (`train.backend`).
A new backend is a new file here plus one line in asset_dist/registry.py.
"""
