"""Matting videos: frame I/O (`io`), temporal smoothing (`temporal`) and the per-video driver (`matte`)."""
