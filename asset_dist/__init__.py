"""asset_dist: cluster-scale training and bulk editing for ASSET (SIGGRAPH 2022)."""

__version__ = "0.1.0"
