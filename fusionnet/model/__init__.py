"""The Late Fusion CNN (paper Fig. 2) and its model file.

    from fusionnet.model import LateFusionNet, load, save
    net = LateFusionNet(backbone="efficientnet_lite0", pretrained=True)
    save(net, "model.safetensors"); net = load("model.safetensors")

- `network`: encoder -> two decoders -> fusion network -> Eq. 2 (`LateFusionNet`, `blend`);
- `backbones`: the encoder table (DenseNets, EfficientNet-Lite) and their offline weights;
- `checkpoint`: the safetensors model file with the config in its header.
To open a model for inference (a path or a `models:/` URI, on a device), use
`fusionnet.inference.loading.load_model`.
"""

from fusionnet.model.backbones import BACKBONES
from fusionnet.model.checkpoint import load, read_metadata, save
from fusionnet.model.network import Decoder, LateFusionNet, MattingOutput, blend, count_parameters

__all__ = ["BACKBONES", "Decoder", "LateFusionNet", "MattingOutput", "blend", "count_parameters", "load",
           "read_metadata", "save"]
