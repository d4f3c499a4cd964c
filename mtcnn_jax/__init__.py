"""mtcnn_jax: the reference JAX/Flax implementation of MTCNN (Zhang et al. 2016).

Face detection with five landmarks: three small nets (nets.py) run as a cascade, with the original
released weights (pretrained.py) or your own (checkpoints.py).
"""

from mtcnn_jax.nets import init_params, onet, pnet, rnet
from mtcnn_jax.pretrained import load_pretrained

__all__ = ["init_params", "load_pretrained", "onet", "pnet", "rnet"]
__version__ = "0.1.0"
