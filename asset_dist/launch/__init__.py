"""Launching jobs: submitit (submit.py) and the stage chain (pipeline.py); the sbatch side lives in slurm/.

Where a process sits in the job (rank, world, rendezvous) is the ground layer's `asset_dist.distenv`."""
