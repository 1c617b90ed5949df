"""What `bigseg models` lists without loading torch: every registered architecture's paper, a
note on how it differs from the authors' code, its parameter counts at 19 classes (inference
heads only) in bigseg's default and in the authors' configuration, and its multiply-adds at
1024x2048. The counts are facts about the code, checked against the registry by
`tests/test_models.py`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchFacts:
    paper: str
    note: str
    params: int             # default configuration, 19 classes, without auxiliary training heads
    reference_params: int   # the authors' configuration (the registry's `reference` overrides)
    gmacs: float            # multiply-adds of one 1024x2048 forward pass, default configuration, billions


_LDN = "Krešo et al. 2019, arXiv 1905.05661"
_LDN_NOTE = "SPP fuse D/4 as in the paper; reference: authors' code, SPP 512/128/512"
_SWIFTNET = "Oršić et al. 2019, arXiv 1903.08469"
_SWIFTNET_LITE = "SwiftNet's decoder on an EfficientNet-Lite encoder (head 1280 into the SPP)"
_DEEPLAB = "Chen et al. 2018, arXiv 1802.02611"
_DEEPLAB_NOTE = "OS 16, two 3x3 decoder convs; reference: one (VainF port)"

ARCHITECTURES: dict[str, ArchFacts] = {
    "ladder-dn121": ArchFacts(_LDN, _LDN_NOTE, 9_624_851, 10_314_515, 142.4),
    "ladder-dn169": ArchFacts(_LDN, _LDN_NOTE, 17_311_635, 16_337_427, 152.7),
    "ladder-dn161": ArchFacts(_LDN, _LDN_NOTE, 34_303_091, 31_237_651, 300.6),
    "deeplabv1-vgg16": ArchFacts("Chen et al. 2015, arXiv 1412.7062",
                                 "DeepLab-LargeFOV: fc6 3x3 at rate 12, 1024 wide; OS 8; CRF in predict (--crf)",
                                 20_503_379, 20_503_379, 1005.0),
    "deeplabv2-rn101": ArchFacts("Chen et al. 2017, arXiv 1606.00915",
                                 "ASPP-L at rates 6/12/18/24, OS 8; multi-scale max fusion in training",
                                 43_901_068, 43_901_068, 1463.9),
    "deeplabv3-rn101": ArchFacts("Chen et al. 2017, arXiv 1706.05587",
                                 "ASPP + image pooling, multi-grid 1/2/4; OS 16 in training, 8 in evaluation",
                                 58_040_147, 58_040_147, 1909.9),
    "deeplabv3plus-rn50": ArchFacts(_DEEPLAB, _DEEPLAB_NOTE, 40_351_667, 39_761_331, 553.7),
    "deeplabv3plus-rn101": ArchFacts(_DEEPLAB, _DEEPLAB_NOTE, 59_343_795, 58_753_459, 708.9),
    "deeplabv3plus-xception65": ArchFacts(_DEEPLAB, "modified aligned Xception-65, atrous separable ASPP and "
                                          "decoder, OS 16", 41_054_899, 41_054_899, 410.2),
    "refinenet-rn101": ArchFacts("Lin et al. 2017, arXiv 1611.06612", "2-stage CRP; reference: 4 (authors' later code)",
                                 109_200_467, 117_458_003, 1812.7),
    "dupsampling-rn50": ArchFacts("Tian et al. 2019, arXiv 1903.02120", "OS 16; W fitted by PCA on the training labels",
                                  29_698_945, 29_698_945, 317.3),
    "dynamic-routing-l16": ArchFacts("Li et al. 2020, arXiv 2003.10401", "Dynamic-Raw; budget_lambda > 0 for A/B/C",
                                     17_597_666, 17_597_666, 115.4),
    # SwiftNet: ImageNet-pretrained encoders (`bigseg train --backbone-weights imagenet`)
    "swiftnet-lite0": ArchFacts(_SWIFTNET, _SWIFTNET_LITE, 4_056_047, 4_056_047, 42.8),
    "swiftnet-lite1": ArchFacts(_SWIFTNET, _SWIFTNET_LITE, 4_820_719, 4_820_719, 47.7),
    "swiftnet-lite2": ArchFacts(_SWIFTNET, _SWIFTNET_LITE, 5_498_191, 5_498_191, 50.9),
    "swiftnet-rn18": ArchFacts(_SWIFTNET, "the paper's single-scale SwiftNetRN-18: SPP 3 levels, 128-wide ladder",
                               11_797_071, 11_797_071, 103.6),
}
