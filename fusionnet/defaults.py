"""Defaults and choices the command line shows in `--help`, importable without torch, numpy or OpenCV.

`fusionnet matte --help` and an argument error answer from this module alone (issue 27: each `--help`
took 6-8 s importing torch); the modules that use these values import them from here.
"""

DEFAULT_MAX_SIDE = 800  # paper Sec. 4: longer side below 800 at training and inference
# Images larger than this are decoded downscaled and matted at this size (bounds memory: the float
# image, the maps and the guided filter all scale with the output size).
DEFAULT_MAX_OUTPUT_SIDE = 6144
# The paper gives no radius/eps for the guided filter; these are starting points, tune on validation.
DEFAULT_GUIDED_RADIUS = 8
DEFAULT_GUIDED_EPS = 1e-4
NETWORK_PRECISIONS = ("fp32", "fp32-cl", "bf16", "int8", "fp16")  # "auto" is chosen among them (Matter)
PRECISIONS = (*NETWORK_PRECISIONS, "auto")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_KINDS = ("alpha", "rgba", "composite", "trimap")
# 2**29 pixels (about 23170 x 23170): a 20000x20000 scan fits, a crafted bomb does not.
DEFAULT_MAX_PIXELS = 2**29
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"})
DEFAULT_VIDEO_BATCH_SIZE = 4  # video frames per network call
# bench_video.py sweeps it: higher smooths more and smears moving edges more
DEFAULT_MOTION_THRESHOLD = 0.02
