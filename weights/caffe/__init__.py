"""Import Caffe models (prototxt + caffemodel) as bench encoders.

`import_caffe` writes a native safetensors file with its model card; `caffe_weights` does
the same conversion in memory (what `load_encoder` uses for a `.caffemodel` path);
`read_caffemodel` and `read_prototxt` are the two readers. See convert.py for how a
prototxt's input mean and scale are folded into conv1 and prototxt.py for the architectures
accepted.
"""

from weights.caffe.caffemodel import read_caffemodel
from weights.caffe.convert import (
    CAFFEMODEL_SUFFIX,
    PROTOTXT_SUFFIX,
    CaffeWeights,
    caffe_weights,
    default_method,
    import_caffe,
)
from weights.caffe.prototxt import DEFAULT_MEAN_BGR, LayerSpec, NetSpec, read_prototxt

__all__ = [
    "CAFFEMODEL_SUFFIX",
    "DEFAULT_MEAN_BGR",
    "PROTOTXT_SUFFIX",
    "CaffeWeights",
    "LayerSpec",
    "NetSpec",
    "caffe_weights",
    "default_method",
    "import_caffe",
    "read_caffemodel",
    "read_prototxt",
]
