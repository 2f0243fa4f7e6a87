"""fusionnet: the Late Fusion CNN for digital matting (Zhang et al., CVPR 2019).

The library knows nothing about DVC, Prefect or MLflow; `stages/` and `pipeline/` call it.
"""

__version__ = "0.1.0"
